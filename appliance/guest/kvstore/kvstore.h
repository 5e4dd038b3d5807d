/* kvstore: a Redis (RESP2) server on the guest TCP stack. */
#ifndef KVSTORE_H
#define KVSTORE_H

#include "platform.h"
#include "net.h"

#define KV_MAX_BULK    (16u << 20)   /* largest argument (Redis: 512 MiB) */
#define KV_MAX_QUERY   (32u << 20)   /* largest unparsed input per client */
#define KV_MAX_ARGS    (1u << 20)
#define KV_MAX_INLINE  (64u << 10)
#define KV_OUT_HIGH    (1u << 20)    /* stop parsing while this much output waits */
#define KV_READ_BATCH  (64u << 10)   /* input taken from TCP per parsing round */

struct buf {
    uint8_t *p;
    size_t len, cap;
    bool oom;   /* an append failed: the client is dropped */
};

struct arg {
    const uint8_t *p;
    size_t len;
};

struct multi_state;

struct client {
    tcp_conn *conn;
    uint64_t id;          /* CLIENT ID: accept order, the same on both COLO copies */
    char *name;           /* CLIENT SETNAME; NULL when unnamed */
    struct multi_state *multi;  /* commands queued since MULTI; NULL outside one */
    size_t watching;      /* keys this client WATCHes */
    bool watch_dirty;     /* a watched key was written: the next EXEC answers nil */
    struct buf in;
    size_t in_off;        /* parsed prefix of in */
    struct buf out;
    size_t out_off;       /* part of out already handed to TCP */
    struct arg *argv;
    size_t argv_cap;
    bool close_after;     /* QUIT or protocol error: close once out is sent */
    bool peer_fin;
};

/* resp.c */
void buf_append(struct buf *b, const void *p, size_t n);
void reply_raw(struct client *cl, const char *s);
void reply_status(struct client *cl, const char *s);
void reply_error(struct client *cl, const char *fmt, ...);
void reply_int(struct client *cl, long long v);
void reply_bulk(struct client *cl, const void *p, size_t n);
void reply_nil(struct client *cl);
void reply_array(struct client *cl, size_t n);
/* Parses one command from cl->in at in_off.  Returns the argument count
 * (>0) with cl->argv filled, 0 when more input is needed or a line was
 * empty (*used > 0), -1 on a protocol error (already replied). */
long resp_parse(struct client *cl, size_t *used);
/* Strict decimal (Redis string2ll): no spaces, no '+', no leading zeros. */
bool parse_ll(const uint8_t *p, size_t n, long long *out);
size_t fmt_ll(char *buf, long long v);

/* glob.c: does the whole of s match the pattern?  Never worse than
 * O(pattern * s): a mismatch backtracks only to the last '*'. */
bool glob_match(const uint8_t *pat, size_t plen, const uint8_t *s, size_t slen, bool nocase);

/* commands.c */
int kv_init(void);
/* Numbers a new client (before its first command). */
void kv_client_init(struct client *cl);
/* Drops a departing client's transaction, watches and name. */
void kv_client_gone(struct client *cl);
void kv_execute(struct client *cl, size_t argc);
/* Active expiry: when the next sweep is due (UINT64_MAX when no key has a
 * TTL), and the sweep itself, run from the main loop after net_poll(). */
uint64_t kv_sweep_deadline(void);
void kv_sweep(void);

#endif
