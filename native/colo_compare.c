/*
 * The COLO packet comparer in C: netfilter/compare.py's PyComparer, decision for decision,
 * so the datapath loop (native/colo_path.c) can run it without the GIL.  The module and
 * class docstrings of compare.py are the specification; the comments here only say where
 * C needs more words than Python (ownership, absent values, the hash table).
 *
 * The lower half wraps the same engine as the Python type native._native.Comparer.
 *
 * Ownership: a queued frame (struct held, the frame copied behind it) is referenced from up
 * to three lists of its connection (a TCP primary frame sits in the arrival-order queue
 * and in the unverified segments or the unmatched controls) and is freed when the last
 * list lets go, as Python's objects are.  A frame released early from the queue may stay
 * among the unverified segments until a checkpoint, exactly as in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "colo.h"
#include "conn_table.h"

#define SEQ_NONE (-1)   /* an absent sequence number (Python's None); present ones are 0..2**32-1 */

static const char *const flow_names[PKT_FLOWS] = {"tcp", "udp", "icmp", "other", "non-ip"};
static const char *const counter_names[CMP_COUNTERS] = {
    "primary", "secondary", "released", "matched", "mismatches", "timeouts", "dropped", "malformed"};

/* a - b in 32-bit sequence space, as a signed number (RFC 793 modular comparison). */
static inline int32_t seq_diff(uint32_t a, uint32_t b)
{
    return (int32_t)(a - b);
}

/* max of an optional sequence number and a present one, modulo 2**32. */
static inline int64_t seq_max(int64_t a, uint32_t b)
{
    return a == SEQ_NONE || seq_diff(b, (uint32_t)a) > 0 ? b : a;
}

/* --- queued frames ------------------------------------------------------------------- */

typedef struct held {
    unsigned refs;              /* lists holding it */
    enum pkt_flow flow;
    double arrived;
    uint64_t order;             /* global arrival number: the order of release at a checkpoint */
    bool timed_out;             /* counted as a timeout already */
    bool matched;               /* a SYN or RST whose counterpart was found */
    bool retransmit;            /* TCP: its content was verified before it arrived */
    bool used;                  /* a secondary segment that took part in a comparison */
    bool stream;                /* TCP data or FIN to compare */
    unsigned control;           /* TCP flags & (SYN | RST) */
    unsigned tcp_flags;
    uint32_t seq, ack, data_end, end;   /* TCP: the sequence range; SYN and FIN take one position */
    size_t ip, transport, ip_end, payload, payload_len;
    size_t len;
    uint8_t frame[];
} held;

static held *held_new(const uint8_t *frame, size_t len, const pkt_info *k, double now, uint64_t order)
{
    held *h = malloc(sizeof *h + len);
    if (!h)
        return NULL;
    memset(h, 0, sizeof *h);
    memcpy(h->frame, frame, len);
    h->len = len;
    h->flow = k->flow;
    h->arrived = now;
    h->order = order;
    h->ip = k->ip;
    h->transport = k->transport;
    h->ip_end = k->ip_end;
    h->payload = k->payload;
    h->payload_len = k->payload_len;
    if (k->flow == PKT_TCP) {
        h->tcp_flags = k->tcp_flags;
        h->control = k->tcp_flags & (PKT_SYN | PKT_RST);
        h->stream = !h->control && (k->payload_len > 0 || (k->tcp_flags & PKT_FIN));
        h->seq = k->seq;
        h->ack = k->ack;
        h->data_end = k->seq + (uint32_t)k->payload_len;
        if (k->tcp_flags & PKT_SYN)
            h->end = h->data_end + 1;
        else if (k->tcp_flags & PKT_RST)
            h->end = k->seq;
        else
            h->end = h->data_end + (k->tcp_flags & PKT_FIN ? 1 : 0);
    }
    return h;
}

static void held_unref(held *h)
{
    if (--h->refs == 0)
        free(h);
}

/* What a UDP, ICMP or other frame must equal (_datagram_content): UDP and ICMP from the
 * transport header on but the checksum (bytes 6-7, 2-3), else the whole IP packet.  The
 * skipped checksum lies at a fixed place, so two contents are equal when their spans are
 * of one length and equal outside it. */
static bool datagram_equal(const held *a, const held *b, enum pkt_flow flow)
{
    size_t a_from = flow == PKT_OTHER ? a->ip : a->transport;
    size_t b_from = flow == PKT_OTHER ? b->ip : b->transport;
    size_t length = a->ip_end - a_from;
    if (length != b->ip_end - b_from)
        return false;
    const uint8_t *x = a->frame + a_from, *y = b->frame + b_from;
    if (flow == PKT_OTHER)
        return memcmp(x, y, length) == 0;
    size_t skip = flow == PKT_UDP ? 6 : 2;          /* the checksum's offset; it is 2 bytes long */
    return memcmp(x, y, skip) == 0 && memcmp(x + skip + 2, y + skip + 2, length - skip - 2) == 0;
}

/* A growable array of frames (Python's list). */
typedef struct {
    held **items;
    size_t n, cap;
} held_list;

static bool list_insert(held_list *l, size_t at, held *h)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        held **items = realloc(l->items, cap * sizeof *items);
        if (!items)
            return false;
        l->items = items;
        l->cap = cap;
    }
    memmove(l->items + at + 1, l->items + at, (l->n - at) * sizeof *l->items);
    l->items[at] = h;
    l->n++;
    h->refs++;
    return true;
}

static bool list_append(held_list *l, held *h)
{
    return list_insert(l, l->n, h);
}

/* Takes out `count` items from `at` on, without letting go of them. */
static void list_cut(held_list *l, size_t at, size_t count)
{
    if (!count)
        return;
    memmove(l->items + at, l->items + at + count, (l->n - at - count) * sizeof *l->items);
    l->n -= count;
}

static void list_remove(held_list *l, size_t at)
{
    held *h = l->items[at];
    list_cut(l, at, 1);
    held_unref(h);
}

static void list_clear(held_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        held_unref(l->items[i]);
    l->n = 0;
}

static void list_free(held_list *l)
{
    list_clear(l);
    free(l->items);
    l->items = NULL;
    l->cap = 0;
}

/* _Segments.add: bisect.insort_right by the sequence number relative to `base` (or to the
 * first segment's, or its own), the same binary search, so an unsorted list (sequence
 * numbers half the space apart) gets the same order as in Python. */
static bool segments_add(held_list *l, held *h, int64_t base)
{
    uint32_t origin = base != SEQ_NONE ? (uint32_t)base : l->n ? l->items[0]->seq : h->seq;
    int32_t key = seq_diff(h->seq, origin);
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (key < seq_diff(l->items[mid]->seq, origin))
            hi = mid;
        else
            lo = mid + 1;
    }
    return list_insert(l, lo, h);
}

/* --- connections ---------------------------------------------------------------------- */

/* Packet.key and the flow class: the two (ip, port) ends in a canonical order. */
typedef struct {
    uint8_t flow, protocol;
    uint16_t port_a, port_b;
    uint32_t ip_a, ip_b;
} conn_key;

typedef struct conn {
    conn_link link;                     /* in the table (first: conn_table.h) */
    struct conn *prev, *next;           /* every connection, for scans and checkpoints */
    conn_key key;
    bool active;                        /* a frame since the last checkpoint */
    bool diverged;
    held_list primary;                  /* every held primary frame, in arrival order */
    held_list secondary;                /* UDP, ICMP, other: the secondary's frames, in arrival order */
    /* TCP (_TcpConnection) */
    held_list unverified;               /* the primary's data and FIN segments past base */
    held_list primary_controls;         /* the primary's SYNs and RSTs not matched yet */
    held_list secondary_stream;
    held_list secondary_controls;       /* bare ACKs are not kept: their ack number is all they bring */
    int64_t base;
    int64_t syn_seq;                    /* the PVM's matched SYN: a SYN there is a retransmit */
    int64_t secondary_syn_seq;          /* the SVM's, as it arrived */
    int64_t secondary_acked;            /* the highest ack the secondary sent */
    int64_t primary_end;                /* the end of all the primary has sent */
    int64_t primary_acked;
    int64_t primary_syn_seq;            /* the primary's last SYN, matched or not */
} conn;

struct comparer {
    double compare_timeout;             /* seconds */
    size_t max_queue_size;
    cmp_passthrough *passthrough;
    size_t n_passthrough;
    cmp_release_fn release;
    cmp_checkpoint_fn request_checkpoint;
    void *ctx;
    conn_table table;
    conn *all;                          /* the list of every connection */
    size_t held;                        /* primary frames held, over all connections */
    uint64_t order;
    bool failed_over;
    uint64_t counters[PKT_FLOWS][CMP_COUNTERS];
};

static conn_key key_of(const pkt_info *k)
{
    conn_key key = {.flow = (uint8_t)k->flow, .protocol = (uint8_t)k->protocol};
    uint64_t a = (uint64_t)k->src << 16 | k->sport, b = (uint64_t)k->dst << 16 | k->dport;
    if (a > b) {
        uint64_t t = a;
        a = b;
        b = t;
    }
    key.ip_a = (uint32_t)(a >> 16);
    key.port_a = (uint16_t)a;
    key.ip_b = (uint32_t)(b >> 16);
    key.port_b = (uint16_t)b;
    return key;
}

static bool key_equal(const conn_key *x, const conn_key *y)
{
    return x->flow == y->flow && x->protocol == y->protocol && x->ip_a == y->ip_a && x->ip_b == y->ip_b
        && x->port_a == y->port_a && x->port_b == y->port_b;
}

static uint64_t hash_of(const comparer *c, const conn_key *k)
{
    return ct_hash(&c->table, (uint64_t)k->ip_a << 32 | k->ip_b,
                   (uint64_t)k->port_a << 32 | (uint64_t)k->port_b << 16 | (uint64_t)k->flow << 8 | k->protocol);
}

static int same_key(const conn_link *link, const void *key)
{
    return key_equal(&((const conn *)link)->key, key);
}

/* _connection: the connection, created when new, marked active.  NULL on no memory. */
static conn *connection(comparer *c, const pkt_info *k)
{
    conn_key key = key_of(k);
    uint64_t hash = hash_of(c, &key);
    conn *x = (conn *)*ct_find(&c->table, hash, same_key, &key);
    if (!x) {
        x = calloc(1, sizeof *x);
        if (!x)
            return NULL;
        x->key = key;
        x->base = x->syn_seq = x->secondary_syn_seq = x->secondary_acked = SEQ_NONE;
        x->primary_end = x->primary_acked = x->primary_syn_seq = SEQ_NONE;
        x->next = c->all;
        if (c->all)
            c->all->prev = x;
        c->all = x;
        ct_insert(&c->table, &x->link, hash);
    }
    x->active = true;
    return x;
}

static void conn_clear(comparer *c, conn *x)
{
    c->held -= x->primary.n;
    list_clear(&x->primary);
    list_clear(&x->secondary);
    list_clear(&x->unverified);
    list_clear(&x->primary_controls);
    list_clear(&x->secondary_stream);
    list_clear(&x->secondary_controls);
}

static void conn_delete(comparer *c, conn *x)
{
    ct_unlink(&c->table, ct_find(&c->table, x->link.hash, same_key, &x->key));
    if (x->prev)
        x->prev->next = x->next;
    else
        c->all = x->next;
    if (x->next)
        x->next->prev = x->prev;
    conn_clear(c, x);
    list_free(&x->primary);
    list_free(&x->secondary);
    list_free(&x->unverified);
    list_free(&x->primary_controls);
    list_free(&x->secondary_stream);
    list_free(&x->secondary_controls);
    free(x);
}

/* secondary_frames(): how many secondary frames the connection keeps. */
static size_t secondary_count(const conn *x)
{
    return x->secondary.n + x->secondary_stream.n + x->secondary_controls.n;
}

/* --- the engine ------------------------------------------------------------------------ */

static void send_frame(comparer *c, const uint8_t *frame, size_t len, enum pkt_flow flow, bool matched)
{
    c->counters[flow][CMP_RELEASED]++;
    c->counters[flow][CMP_MATCHED] += matched;
    c->release(c->ctx, frame, len);
}

static void mismatch(comparer *c, conn *x)
{
    x->diverged = true;
    c->counters[x->key.flow][CMP_MISMATCHES]++;
    c->request_checkpoint(c->ctx, "mismatch");
}

/* _hold: queues a primary frame; beyond the bound (or with no memory), drops it and asks
 * for a checkpoint. */
static bool hold(comparer *c, conn *x, held *h)
{
    if (x->primary.n >= c->max_queue_size || !list_append(&x->primary, h)) {
        c->counters[x->key.flow][CMP_DROPPED]++;
        c->request_checkpoint(c->ctx, "mismatch");
        return false;
    }
    c->held++;
    return true;
}

/* _compare_datagrams (QEMU's colo_compare_packet): the oldest primary frame against any
 * secondary one. */
static void compare_datagrams(comparer *c, conn *x)
{
    enum pkt_flow flow = x->key.flow;
    while (x->primary.n && x->secondary.n && !x->diverged) {
        held *p = x->primary.items[0];
        size_t i = 0;
        while (i < x->secondary.n && !datagram_equal(x->secondary.items[i], p, flow))
            i++;
        if (i == x->secondary.n) {
            mismatch(c, x);
            return;
        }
        list_remove(&x->secondary, i);
        list_cut(&x->primary, 0, 1);
        c->held--;
        send_frame(c, p->frame, p->len, flow, true);
        held_unref(p);
    }
}

static bool tcp_ready(const conn *x, const held *h)
{
    if ((h->tcp_flags & PKT_ACK)
        && (x->secondary_acked == SEQ_NONE || seq_diff(h->ack, (uint32_t)x->secondary_acked) > 0))
        return false;
    if (h->control)
        return h->matched || h->retransmit;
    if (h->stream)
        return seq_diff(h->end, (uint32_t)x->base) <= 0;
    return true;
}

/* _match_tcp_controls: SYNs by flags and payload, RSTs by sequence number. */
static void match_tcp_controls(comparer *c, conn *x)
{
    size_t i = 0;
    while (i < x->primary_controls.n) {
        held *p = x->primary_controls.items[i];
        size_t first = x->secondary_controls.n, at = first;
        for (size_t j = 0; j < x->secondary_controls.n; j++) {
            held *s = x->secondary_controls.items[j];
            if (s->control != p->control)
                continue;
            if (first == x->secondary_controls.n)
                first = j;
            if (at == x->secondary_controls.n && s->seq == p->seq)
                at = j;
        }
        if (first == x->secondary_controls.n) {     /* no candidates */
            i++;
            continue;
        }
        if (p->tcp_flags & PKT_SYN) {
            held *s = x->secondary_controls.items[first];
            if ((s->tcp_flags & PKT_ACK) != (p->tcp_flags & PKT_ACK) || s->payload_len != p->payload_len
                || memcmp(s->frame + s->payload, p->frame + p->payload, p->payload_len) != 0) {
                mismatch(c, x);
                return;
            }
            x->syn_seq = p->seq;
            x->secondary_syn_seq = s->seq;
            x->base = p->end;
            at = first;
        } else if (at == x->secondary_controls.n) {
            mismatch(c, x);
            return;
        }
        list_remove(&x->secondary_controls, at);
        p->matched = true;
        list_remove(&x->primary_controls, i);       /* the next one moves to i */
    }
}

/* _Segments.covering: pops the segments lying wholly behind `base` (counting the secondary
 * ones never used as dropped) and returns the first one if it covers `base`. */
static held *covering(comparer *c, held_list *l, uint32_t base, bool count_dropped)
{
    size_t behind = 0;
    while (behind < l->n && seq_diff(l->items[behind]->end, base) <= 0) {
        if (count_dropped && !l->items[behind]->used)
            c->counters[PKT_TCP][CMP_DROPPED]++;
        held_unref(l->items[behind]);
        behind++;
    }
    list_cut(l, 0, behind);
    return l->n && seq_diff(l->items[0]->seq, base) <= 0 ? l->items[0] : NULL;
}

/* Python's bytes[start:start + length] of a payload, as (offset, length) clamped to it. */
static void slice(const held *h, int64_t start, int64_t length, size_t *from, size_t *count)
{
    int64_t n = (int64_t)h->payload_len, stop = start + length;
    if (start < 0)
        start = start + n < 0 ? 0 : start + n;
    if (stop < 0)
        stop = stop + n < 0 ? 0 : stop + n;
    if (start > n)
        start = n;
    if (stop > n)
        stop = n;
    *from = (size_t)start;
    *count = stop > start ? (size_t)(stop - start) : 0;
}

/* _compare_tcp_stream: moves base over what both guests have sent equal. */
static void compare_tcp_stream(comparer *c, conn *x)
{
    while (x->base != SEQ_NONE) {
        uint32_t base = (uint32_t)x->base;
        held *p = covering(c, &x->unverified, base, false);
        held *s = covering(c, &x->secondary_stream, base, true);
        if (!p || !s)
            return;
        s->used = true;
        bool primary_fin = base == p->data_end, secondary_fin = base == s->data_end;
        if (primary_fin || secondary_fin) {             /* the position at base is a FIN */
            if (primary_fin != secondary_fin) {
                mismatch(c, x);
                return;
            }
            x->base = (uint32_t)(base + 1);
            continue;
        }
        int64_t p_left = seq_diff(p->data_end, base), s_left = seq_diff(s->data_end, base);
        int64_t length = p_left < s_left ? p_left : s_left;
        size_t p_from, p_count, s_from, s_count;
        slice(p, seq_diff(base, p->seq), length, &p_from, &p_count);
        slice(s, seq_diff(base, s->seq), length, &s_from, &s_count);
        /* equal_prefix(ours, theirs) == length */
        if (length <= 0 || (int64_t)p_count < length || (int64_t)s_count < length
            || memcmp(p->frame + p->payload + p_from, s->frame + s->payload + s_from, (size_t)length) != 0) {
            mismatch(c, x);
            return;
        }
        x->base = (uint32_t)(base + (uint32_t)length);
    }
}

static void compare_tcp(comparer *c, conn *x)
{
    if (!x->diverged)
        match_tcp_controls(c, x);
    if (!x->diverged)
        compare_tcp_stream(c, x);
    size_t released = 0;
    while (released < x->primary.n && tcp_ready(x, x->primary.items[released])) {
        held *h = x->primary.items[released++];
        send_frame(c, h->frame, h->len, PKT_TCP, !h->retransmit);
    }
    for (size_t i = 0; i < released; i++)
        held_unref(x->primary.items[i]);
    list_cut(&x->primary, 0, released);
    c->held -= released;
}

static void tcp_primary(comparer *c, conn *x, held *h)
{
    if (h->tcp_flags & PKT_SYN) {
        x->primary_syn_seq = h->seq;
        h->retransmit = x->syn_seq != SEQ_NONE && h->seq == (uint32_t)x->syn_seq;
    } else if (!(h->tcp_flags & PKT_RST)) {
        if (x->base == SEQ_NONE)
            x->base = h->seq;
        h->retransmit = h->stream && seq_diff(h->end, (uint32_t)x->base) <= 0;
    }
    x->primary_end = seq_max(x->primary_end, h->end);
    if (h->tcp_flags & PKT_ACK)
        x->primary_acked = seq_max(x->primary_acked, h->ack);
    if (h->retransmit && tcp_ready(x, h)) {             /* compared before: out at once, ahead of the queue */
        send_frame(c, h->frame, h->len, PKT_TCP, false);
        return;
    }
    if (!hold(c, x, h))
        return;
    if (h->control && !h->retransmit) {
        if (!list_append(&x->primary_controls, h))
            mismatch(c, x);                             /* no memory: a checkpoint releases it */
    } else if (h->stream && !h->retransmit) {
        if (!segments_add(&x->unverified, h, x->base))
            mismatch(c, x);
    }
    compare_tcp(c, x);
}

static void tcp_secondary(comparer *c, conn *x, const uint8_t *frame, size_t len, const pkt_info *k, double now)
{
    if (k->tcp_flags & PKT_ACK)
        x->secondary_acked = seq_max(x->secondary_acked, k->ack);
    unsigned control = k->tcp_flags & (PKT_SYN | PKT_RST);
    bool stream = !control && (k->payload_len > 0 || (k->tcp_flags & PKT_FIN));
    if (stream || control) {
        bool stale;
        if (k->tcp_flags & PKT_SYN) {                   /* the SYN matched before */
            stale = (x->syn_seq != SEQ_NONE && k->seq == (uint32_t)x->syn_seq)
                 || (x->secondary_syn_seq != SEQ_NONE && k->seq == (uint32_t)x->secondary_syn_seq);
        } else {
            uint32_t end = k->seq + (uint32_t)k->payload_len + (k->tcp_flags & PKT_FIN ? 1 : 0);
            stale = stream && x->base != SEQ_NONE && seq_diff(end, (uint32_t)x->base) <= 0;
        }
        held *h = NULL;
        if (!stale && x->secondary_stream.n + x->secondary_controls.n < c->max_queue_size)
            h = held_new(frame, len, k, now, c->order++);
        if (!h || !(stream ? segments_add(&x->secondary_stream, h, x->base)
                           : list_append(&x->secondary_controls, h))) {
            c->counters[PKT_TCP][CMP_DROPPED]++;
            free(h);
        }
    }
    compare_tcp(c, x);
}

static bool passes_through(const comparer *c, const pkt_info *k)
{
    if (k->flow != PKT_TCP && k->flow != PKT_UDP)
        return false;
    for (size_t i = 0; i < c->n_passthrough; i++) {
        const cmp_passthrough *p = &c->passthrough[i];
        if (p->protocol == k->protocol && (p->port == k->sport || p->port == k->dport))
            return true;
    }
    return false;
}

/* _parse: counts the frame on its side; false when malformed. */
static bool parse_counted(comparer *c, const uint8_t *frame, size_t len, pkt_info *k, enum cmp_counter side)
{
    int malformed = pkt_parse(frame, len, k) < 0;
    c->counters[k->flow][side]++;
    c->counters[k->flow][CMP_MALFORMED] += malformed;
    return !malformed;
}

void cmp_primary(comparer *c, const uint8_t *frame, size_t len, double now)
{
    pkt_info k;
    if (!parse_counted(c, frame, len, &k, CMP_PRIMARY) || k.flow == PKT_NON_IP || c->failed_over
        || passes_through(c, &k)) {
        send_frame(c, frame, len, k.flow, false);
        return;
    }
    conn *x = connection(c, &k);
    held *h = x ? held_new(frame, len, &k, now, c->order++) : NULL;
    if (!h) {                                           /* no memory: as a frame beyond the bound */
        c->counters[k.flow][CMP_DROPPED]++;
        c->request_checkpoint(c->ctx, "mismatch");
        return;
    }
    h->refs++;                                          /* ours until the end of this call */
    if (k.flow == PKT_TCP)
        tcp_primary(c, x, h);
    else if (hold(c, x, h))
        compare_datagrams(c, x);
    held_unref(h);
}

void cmp_secondary(comparer *c, const uint8_t *frame, size_t len, double now)
{
    pkt_info k;
    if (!parse_counted(c, frame, len, &k, CMP_SECONDARY) || k.flow == PKT_NON_IP || c->failed_over
        || passes_through(c, &k)) {
        c->counters[k.flow][CMP_DROPPED]++;
        return;
    }
    conn *x = connection(c, &k);
    if (!x) {
        c->counters[k.flow][CMP_DROPPED]++;
        return;
    }
    if (k.flow == PKT_TCP) {
        tcp_secondary(c, x, frame, len, &k, now);
        return;
    }
    held *h = NULL;
    if (x->secondary.n < c->max_queue_size)
        h = held_new(frame, len, &k, now, c->order++);
    if (!h || !list_append(&x->secondary, h)) {
        c->counters[k.flow][CMP_DROPPED]++;
        free(h);
        return;
    }
    compare_datagrams(c, x);
}

static void expire(comparer *c, const held_list *l, enum pkt_flow flow, double deadline, bool *expired)
{
    for (size_t i = 0; i < l->n; i++) {
        held *h = l->items[i];
        if (h->arrived < deadline) {
            *expired = true;
            if (!h->timed_out) {
                h->timed_out = true;
                c->counters[flow][CMP_TIMEOUTS]++;
            }
        }
    }
}

int cmp_scan_expired(comparer *c, double now)
{
    double deadline = now - c->compare_timeout;
    bool expired = false;
    for (conn *x = c->all; x; x = x->next) {
        enum pkt_flow flow = x->key.flow;
        expire(c, &x->primary, flow, deadline, &expired);
        expire(c, &x->secondary, flow, deadline, &expired);
        expire(c, &x->secondary_stream, flow, deadline, &expired);
        expire(c, &x->secondary_controls, flow, deadline, &expired);
    }
    if (expired)
        c->request_checkpoint(c->ctx, "mismatch");
    return expired;
}

static int by_order(const void *a, const void *b)
{
    uint64_t x = (*(held *const *)a)->order, y = (*(held *const *)b)->order;
    return x < y ? -1 : x > y;
}

/* _flush: every held primary frame out in arrival order, every secondary frame dropped. */
static void flush(comparer *c)
{
    held **all = malloc((c->held ? c->held : 1) * sizeof *all);
    size_t n = 0;
    for (conn *x = c->all; x; x = x->next) {
        c->counters[x->key.flow][CMP_DROPPED] += secondary_count(x);
        for (size_t i = 0; i < x->primary.n; i++) {
            held *h = x->primary.items[i];
            if (!all) {                                 /* no memory to sort them: connection by connection */
                send_frame(c, h->frame, h->len, h->flow, false);
                continue;
            }
            h->refs++;
            all[n++] = h;
        }
        conn_clear(c, x);
    }
    if (!all)
        return;
    qsort(all, n, sizeof *all, by_order);
    for (size_t i = 0; i < n; i++) {
        send_frame(c, all[i]->frame, all[i]->len, all[i]->flow, false);
        held_unref(all[i]);
    }
    free(all);
}

void cmp_checkpoint(comparer *c)
{
    flush(c);
    conn *next;
    for (conn *x = c->all; x; x = next) {
        next = x->next;
        if (!x->active || x->key.flow != PKT_TCP) {     /* idle, or keeping no state */
            conn_delete(c, x);
            continue;
        }
        x->active = false;
        x->diverged = false;
        if (x->primary_end != SEQ_NONE)
            x->base = seq_max(x->base, (uint32_t)x->primary_end);
        if (x->primary_acked != SEQ_NONE)
            x->secondary_acked = seq_max(x->secondary_acked, (uint32_t)x->primary_acked);
        if (x->primary_syn_seq != SEQ_NONE)             /* the SVM's SYN is the PVM's from now on */
            x->syn_seq = x->secondary_syn_seq = x->primary_syn_seq;
    }
}

static void delete_all(comparer *c)
{
    while (c->all)
        conn_delete(c, c->all);
}

void cmp_failover(comparer *c)
{
    flush(c);
    delete_all(c);
    c->failed_over = true;
}

int cmp_failed_over(const comparer *c)
{
    return c->failed_over;
}

size_t cmp_held(const comparer *c)
{
    return c->held;
}

const uint64_t (*cmp_counters(const comparer *c))[CMP_COUNTERS]
{
    return c->counters;
}

/* cmp_new with the timeout in seconds (the Python type takes any positive number of ms). */
static comparer *comparer_create(double compare_timeout, size_t max_queue_size,
                                 const cmp_passthrough *passthrough, size_t n_passthrough,
                                 cmp_release_fn release, cmp_checkpoint_fn request_checkpoint, void *ctx)
{
    if (!(compare_timeout > 0) || max_queue_size == 0)
        return NULL;
    for (size_t i = 0; i < n_passthrough; i++)
        if (passthrough[i].protocol != 6 && passthrough[i].protocol != 17)
            return NULL;
    comparer *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->compare_timeout = compare_timeout;
    c->max_queue_size = max_queue_size;
    c->release = release;
    c->request_checkpoint = request_checkpoint;
    c->ctx = ctx;
    c->passthrough = malloc((n_passthrough ? n_passthrough : 1) * sizeof *c->passthrough);
    if (ct_init(&c->table) < 0 || !c->passthrough) {
        cmp_free(c);
        return NULL;
    }
    if (n_passthrough)
        memcpy(c->passthrough, passthrough, n_passthrough * sizeof *passthrough);
    c->n_passthrough = n_passthrough;
    return c;
}

comparer *cmp_new(unsigned compare_timeout_ms, unsigned max_queue_size,
                  const cmp_passthrough *passthrough, size_t n_passthrough,
                  cmp_release_fn release, cmp_checkpoint_fn request_checkpoint, void *ctx)
{
    return comparer_create(compare_timeout_ms / 1000.0, max_queue_size, passthrough, n_passthrough,
                           release, request_checkpoint, ctx);
}

/* Frees everything held without releasing it (cmp_failover first to send it). */
void cmp_free(comparer *c)
{
    if (!c)
        return;
    if (c->table.buckets)
        delete_all(c);
    free(c->table.buckets);
    free(c->passthrough);
    free(c);
}

/* --- native._native.Comparer: netfilter.compare.PyComparer's API over the engine -------- */

typedef struct {
    PyObject_HEAD
    comparer *c;
    PyObject *release, *request_checkpoint, *clock;
    PyObject *compare_timeout;          /* seconds, as PyComparer.compare_timeout */
    PyObject *max_queue_size;
    PyObject *passthrough;              /* {(protocol, port)}, as PyComparer.passthrough */
    bool busy;                          /* inside a method: the callbacks may not call back in */
    PyObject *error_type, *error_value, *error_traceback;   /* the first callback exception */
} ComparerObject;

/* A callback's exception is kept and raised when the engine returns: the engine goes on
 * with its step, so every other frame still goes out (Python's class stops mid-step). */
static void keep_error(ComparerObject *self)
{
    if (self->error_type) {
        PyErr_Clear();
        return;
    }
    PyErr_Fetch(&self->error_type, &self->error_value, &self->error_traceback);
}

static void py_release(void *ctx, const uint8_t *frame, size_t len)
{
    ComparerObject *self = ctx;
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)frame, (Py_ssize_t)len);
    PyObject *result = bytes ? PyObject_CallOneArg(self->release, bytes) : NULL;
    Py_XDECREF(bytes);
    if (result)
        Py_DECREF(result);
    else
        keep_error(self);
}

static void py_request_checkpoint(void *ctx, const char *reason)
{
    ComparerObject *self = ctx;
    PyObject *text = PyUnicode_FromString(reason);
    PyObject *result = text ? PyObject_CallOneArg(self->request_checkpoint, text) : NULL;
    Py_XDECREF(text);
    if (result)
        Py_DECREF(result);
    else
        keep_error(self);
}

/* False (an exception set) when __init__ has not run (Comparer.__new__ alone). */
static bool initialised(ComparerObject *self)
{
    if (!self->c)
        PyErr_SetString(PyExc_RuntimeError, "Comparer.__init__ has not run");
    return self->c != NULL;
}

/* Enters a method: false (an exception set) when a callback calls back in. */
static bool enter(ComparerObject *self)
{
    if (!initialised(self))
        return false;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a Comparer method was called from its own release or request_checkpoint");
        return false;
    }
    self->busy = true;
    return true;
}

/* Leaves a method: the kept callback exception, if any, is raised. */
static PyObject *leave(ComparerObject *self, PyObject *result)
{
    self->busy = false;
    if (self->error_type) {
        Py_XDECREF(result);
        PyErr_Restore(self->error_type, self->error_value, self->error_traceback);
        self->error_type = self->error_value = self->error_traceback = NULL;
        return NULL;
    }
    return result;
}

static bool now(ComparerObject *self, double *out)
{
    PyObject *t = PyObject_CallNoArgs(self->clock);
    if (!t)
        return false;
    *out = PyFloat_AsDouble(t);
    Py_DECREF(t);
    return !(*out == -1.0 && PyErr_Occurred());
}

typedef void (*frame_method)(comparer *, const uint8_t *, size_t, double);

static PyObject *feed(ComparerObject *self, PyObject *frame, frame_method method)
{
    Py_buffer b;
    double t;
    if (!initialised(self) || PyObject_GetBuffer(frame, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (!now(self, &t) || !enter(self)) {
        PyBuffer_Release(&b);
        return NULL;
    }
    method(self->c, b.buf, (size_t)b.len, t);
    PyBuffer_Release(&b);
    return leave(self, Py_NewRef(Py_None));
}

static PyObject *Comparer_primary(ComparerObject *self, PyObject *frame)
{
    return feed(self, frame, cmp_primary);
}

static PyObject *Comparer_secondary(ComparerObject *self, PyObject *frame)
{
    return feed(self, frame, cmp_secondary);
}

static PyObject *Comparer_scan_expired(ComparerObject *self, PyObject *unused)
{
    double t;
    if (!initialised(self) || !now(self, &t) || !enter(self))
        return NULL;
    return leave(self, PyBool_FromLong(cmp_scan_expired(self->c, t)));
}

static PyObject *Comparer_checkpoint(ComparerObject *self, PyObject *unused)
{
    if (!enter(self))
        return NULL;
    cmp_checkpoint(self->c);
    return leave(self, Py_NewRef(Py_None));
}

static PyObject *Comparer_failover(ComparerObject *self, PyObject *unused)
{
    if (!enter(self))
        return NULL;
    cmp_failover(self->c);
    return leave(self, Py_NewRef(Py_None));
}

PyObject *cmp_counters_dict(const uint64_t counts[PKT_FLOWS][CMP_COUNTERS])
{
    PyObject *all = PyDict_New();
    for (int flow = 0; all && flow < PKT_FLOWS; flow++) {
        PyObject *values = PyDict_New();
        for (int i = 0; values && i < CMP_COUNTERS; i++) {
            PyObject *n = PyLong_FromUnsignedLongLong(counts[flow][i]);
            if (!n || PyDict_SetItemString(values, counter_names[i], n) < 0)
                Py_CLEAR(values);
            Py_XDECREF(n);
        }
        if (!values || PyDict_SetItemString(all, flow_names[flow], values) < 0)
            Py_CLEAR(all);
        Py_XDECREF(values);
    }
    return all;
}

static PyObject *Comparer_counters(ComparerObject *self, void *unused)
{
    if (!initialised(self))
        return NULL;
    return cmp_counters_dict((const uint64_t (*)[CMP_COUNTERS])self->c->counters);
}

static PyObject *Comparer_held(ComparerObject *self, void *unused)
{
    if (!initialised(self))
        return NULL;
    return PyLong_FromSize_t(cmp_held(self->c));
}

static PyObject *Comparer_failed_over(ComparerObject *self, void *unused)
{
    if (!initialised(self))
        return NULL;
    return PyBool_FromLong(cmp_failed_over(self->c));
}

/* ((ip, port), (ip, port)) of a key, in Packet.key's order (the tuples compared, so the
 * dotted quads as strings). */
static PyObject *ends(const conn_key *k)
{
    PyObject *a = Py_BuildValue("(NI)", PyUnicode_FromFormat("%u.%u.%u.%u", k->ip_a >> 24, k->ip_a >> 16 & 255,
                                                            k->ip_a >> 8 & 255, k->ip_a & 255), k->port_a);
    PyObject *b = Py_BuildValue("(NI)", PyUnicode_FromFormat("%u.%u.%u.%u", k->ip_b >> 24, k->ip_b >> 16 & 255,
                                                            k->ip_b >> 8 & 255, k->ip_b & 255), k->port_b);
    int in_order = a && b ? PyObject_RichCompareBool(a, b, Py_LE) : -1;
    PyObject *result = in_order < 0 ? NULL
        : Py_BuildValue("(IOO)", k->protocol, in_order ? a : b, in_order ? b : a);
    Py_XDECREF(a);
    Py_XDECREF(b);
    return result;
}

/* The keys of the connections kept, (flow class, Packet.key), as PyComparer._connections'
 * (tests look at which connections a checkpoint forgets). */
static PyObject *Comparer_connections(ComparerObject *self, void *unused)
{
    if (!initialised(self))
        return NULL;
    PyObject *keys = PyList_New(0);
    for (conn *x = self->c->all; keys && x; x = x->next) {
        PyObject *key = ends(&x->key);
        PyObject *item = key ? Py_BuildValue("(sN)", flow_names[x->key.flow], key) : NULL;
        if (!item || PyList_Append(keys, item) < 0)
            Py_CLEAR(keys);
        Py_XDECREF(item);
    }
    return keys;
}

/* passthrough as PyComparer keeps it: {(protocol.lower(), port)}; the protocols checked. */
static PyObject *passthrough_set(PyObject *passthrough)
{
    PyObject *set = PySet_New(NULL), *iter = set ? PyObject_GetIter(passthrough) : NULL, *item;
    if (!iter) {
        Py_XDECREF(set);
        return NULL;
    }
    while ((item = PyIter_Next(iter))) {
        PyObject *protocol, *port, *lower = NULL, *entry = NULL;
        PyObject *pair = PySequence_Tuple(item);
        Py_DECREF(item);
        if (pair && PyTuple_GET_SIZE(pair) != 2)
            PyErr_Format(PyExc_ValueError, "passthrough entries are (protocol, port), not %R", pair);
        else if (pair && PyArg_UnpackTuple(pair, "passthrough", 2, 2, &protocol, &port))
            lower = PyObject_CallMethod(protocol, "lower", NULL);
        if (lower)
            entry = PyTuple_Pack(2, lower, port);
        Py_XDECREF(pair);
        Py_XDECREF(lower);
        if (!entry || PySet_Add(set, entry) < 0) {
            Py_XDECREF(entry);
            goto error;
        }
        Py_DECREF(entry);
    }
    if (PyErr_Occurred())
        goto error;
    Py_DECREF(iter);
    return set;
error:
    Py_DECREF(iter);
    Py_DECREF(set);
    return NULL;
}

/* The engine's passthrough list; ports that are not ints of 0..65535 never match (as in
 * Python, where they are never equal to a frame's port).  n_out = -1 on a bad protocol. */
static cmp_passthrough *passthrough_list(PyObject *set, Py_ssize_t *n_out)
{
    Py_ssize_t n = 0;
    PyObject *iter = PyObject_GetIter(set), *entry;
    cmp_passthrough *list = iter ? PyMem_Malloc((PySet_GET_SIZE(set) + 1) * sizeof *list) : NULL;
    if (!list) {
        Py_XDECREF(iter);
        return iter ? (cmp_passthrough *)PyErr_NoMemory() : NULL;
    }
    while ((entry = PyIter_Next(iter))) {
        Py_DECREF(entry);                               /* the set keeps it alive */
        PyObject *protocol = PyTuple_GET_ITEM(entry, 0), *port = PyTuple_GET_ITEM(entry, 1);
        unsigned number = PyUnicode_Check(protocol) && PyUnicode_CompareWithASCIIString(protocol, "tcp") == 0 ? 6
                        : PyUnicode_Check(protocol) && PyUnicode_CompareWithASCIIString(protocol, "udp") == 0 ? 17 : 0;
        if (!number) {
            Py_DECREF(iter);
            *n_out = -1;
            return list;
        }
        if (!PyLong_Check(port))
            continue;
        long value = PyLong_AsLong(port);
        if (value == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            continue;
        }
        if (value < 0 || value > 65535)
            continue;
        list[n++] = (cmp_passthrough){number, (unsigned)value};
    }
    Py_DECREF(iter);
    if (PyErr_Occurred()) {
        PyMem_Free(list);
        return NULL;
    }
    *n_out = n;
    return list;
}

cmp_passthrough *cmp_passthrough_parse(PyObject *passthrough, PyObject **set, Py_ssize_t *n)
{
    *set = passthrough ? passthrough_set(passthrough) : PySet_New(NULL);
    cmp_passthrough *list = *set ? passthrough_list(*set, n) : NULL;
    if (list && *n < 0) {
        PyObject *sorted = PySequence_List(*set);
        if (sorted && PyList_Sort(sorted) == 0)
            PyErr_Format(PyExc_ValueError, "passthrough protocols are tcp or udp, not %R", sorted);
        Py_XDECREF(sorted);
        PyMem_Free(list);
        list = NULL;
    }
    if (!list)
        Py_CLEAR(*set);
    return list;
}

static int Comparer_init(ComparerObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"release", "request_checkpoint", "compare_timeout_ms", "max_queue_size",
                               "passthrough", "clock", NULL};
    PyObject *release, *request_checkpoint, *timeout_ms = NULL, *max_queue_size = NULL;
    PyObject *passthrough = NULL, *clock = NULL;
    if (self->c) {
        PyErr_SetString(PyExc_RuntimeError, "Comparer.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OOOO:Comparer", keywords, &release, &request_checkpoint,
                                     &timeout_ms, &max_queue_size, &passthrough, &clock))
        return -1;
    PyObject *default_timeout = PyLong_FromLong(3000), *default_size = PyLong_FromLong(1024);
    PyObject *zero = PyLong_FromLong(0), *thousand = PyLong_FromLong(1000), *timeout = NULL, *set = NULL;
    cmp_passthrough *list = NULL;
    Py_ssize_t n = 0, queue = 0;
    int result = -1;
    if (!default_timeout || !default_size || !zero || !thousand)
        goto done;
    timeout_ms = timeout_ms ? timeout_ms : default_timeout;
    max_queue_size = max_queue_size ? max_queue_size : default_size;
    int timeout_bad = PyObject_RichCompareBool(timeout_ms, zero, Py_LE);
    int size_bad = timeout_bad ? timeout_bad : PyObject_RichCompareBool(max_queue_size, zero, Py_LE);
    if (timeout_bad < 0 || size_bad < 0)
        goto done;
    if (timeout_bad || size_bad) {
        PyErr_SetString(PyExc_ValueError, "compare_timeout_ms and max_queue_size must be positive");
        goto done;
    }
    timeout = PyNumber_TrueDivide(timeout_ms, thousand);
    double timeout_s = timeout ? PyFloat_AsDouble(timeout) : -1.0;
    if (!timeout || (timeout_s == -1.0 && PyErr_Occurred()))
        goto done;
    queue = PyNumber_AsSsize_t(max_queue_size, NULL);       /* beyond Py_ssize_t: as good as unbounded */
    if (queue == -1 && PyErr_Occurred())
        goto done;
    list = cmp_passthrough_parse(passthrough, &set, &n);
    if (!list)
        goto done;
    if (!clock) {
        PyObject *time_module = PyImport_ImportModule("time");
        clock = time_module ? PyObject_GetAttrString(time_module, "monotonic") : NULL;
        Py_XDECREF(time_module);
        if (!clock)
            goto done;
    } else {
        Py_INCREF(clock);
    }
    self->c = comparer_create(timeout_s, (size_t)queue, list, (size_t)n, py_release, py_request_checkpoint, self);
    if (!self->c) {
        Py_DECREF(clock);
        PyErr_NoMemory();
        goto done;
    }
    self->clock = clock;
    self->release = Py_NewRef(release);
    self->request_checkpoint = Py_NewRef(request_checkpoint);
    self->compare_timeout = Py_NewRef(timeout);
    self->max_queue_size = Py_NewRef(max_queue_size);
    self->passthrough = Py_NewRef(set);
    result = 0;
done:
    PyMem_Free(list);
    Py_XDECREF(set);
    Py_XDECREF(timeout);
    Py_XDECREF(default_timeout);
    Py_XDECREF(default_size);
    Py_XDECREF(zero);
    Py_XDECREF(thousand);
    return result;
}

static int Comparer_traverse(ComparerObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->release);
    Py_VISIT(self->request_checkpoint);
    Py_VISIT(self->clock);
    Py_VISIT(self->passthrough);
    return 0;
}

static int Comparer_clear(ComparerObject *self)
{
    Py_CLEAR(self->release);
    Py_CLEAR(self->request_checkpoint);
    Py_CLEAR(self->clock);
    Py_CLEAR(self->compare_timeout);
    Py_CLEAR(self->max_queue_size);
    Py_CLEAR(self->passthrough);
    return 0;
}

static void Comparer_dealloc(ComparerObject *self)
{
    PyObject_GC_UnTrack(self);
    Comparer_clear(self);
    cmp_free(self->c);
    Py_XDECREF(self->error_type);
    Py_XDECREF(self->error_value);
    Py_XDECREF(self->error_traceback);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Comparer_methods[] = {
    {"primary", (PyCFunction)Comparer_primary, METH_O,
     "A frame the PVM sent: released now, or held until it is matched or a checkpoint."},
    {"secondary", (PyCFunction)Comparer_secondary, METH_O,
     "A frame the SVM sent (TCP sequence numbers already in the PVM's space): used for comparison, never sent."},
    {"scan_expired", (PyCFunction)Comparer_scan_expired, METH_NOARGS,
     "Asks for a checkpoint when a frame has waited longer than the compare timeout; True when it asked."},
    {"checkpoint", (PyCFunction)Comparer_checkpoint, METH_NOARGS,
     "Both guests are equal now: everything held goes out in arrival order, comparison starts afresh."},
    {"failover", (PyCFunction)Comparer_failover, METH_NOARGS,
     "COLO is over: everything held goes out, and later primary frames pass unchecked."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Comparer_getset[] = {
    {"counters", (getter)Comparer_counters, NULL, "Per flow class, a copy of the counters.", NULL},
    {"held", (getter)Comparer_held, NULL, "Primary frames held now.", NULL},
    {"failed_over", (getter)Comparer_failed_over, NULL, "True after failover().", NULL},
    {"_connections", (getter)Comparer_connections, NULL, "The keys of the connections kept (for tests).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Comparer_members[] = {
    {"compare_timeout", T_OBJECT, offsetof(ComparerObject, compare_timeout), READONLY, "In seconds."},
    {"max_queue_size", T_OBJECT, offsetof(ComparerObject, max_queue_size), READONLY, NULL},
    {"passthrough", T_OBJECT, offsetof(ComparerObject, passthrough), READONLY, "{(protocol, port)}"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ComparerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "native._native.Comparer",
    .tp_doc = "The COLO packet comparer in C: netfilter.compare.PyComparer's API and behaviour.",
    .tp_basicsize = sizeof(ComparerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Comparer_init,
    .tp_dealloc = (destructor)Comparer_dealloc,
    .tp_traverse = (traverseproc)Comparer_traverse,
    .tp_clear = (inquiry)Comparer_clear,
    .tp_methods = Comparer_methods,
    .tp_getset = Comparer_getset,
    .tp_members = Comparer_members,
};

int colo_compare_register(PyObject *module)
{
    if (PyType_Ready(&ComparerType) < 0)
        return -1;
    Py_INCREF(&ComparerType);
    if (PyModule_AddObject(module, "Comparer", (PyObject *)&ComparerType) < 0) {
        Py_DECREF(&ComparerType);
        return -1;
    }
    return 0;
}
