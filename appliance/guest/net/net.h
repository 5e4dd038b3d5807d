/*
 * The guest's TCP/IP stack: the interface the application sees.
 *
 * Single-threaded and event driven.  The application's loop is:
 *
 *     net_init();
 *     tcp_listen(port, on_accept, arg);
 *     for (;;) {
 *         plat_poll(net_next_deadline());
 *         net_poll();          // frames in, timers, then callbacks
 *     }
 *
 * TCP callbacks run from net_poll() once a received frame has been fully
 * processed, so the stack is never re-entered half way through a segment;
 * a UDP receive callback runs as its datagram arrives (it may udp_sendto).
 * Nothing here uses randomness: the stack reads plat_now_ns() once per
 * net_poll(), and given the same frames in the same iterations with the same
 * clock values it emits the same frames (needed by COLO).
 */
#ifndef NET_H
#define NET_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

/* Addresses are host-order uint32_t (10.0.0.2 == 0x0a000002). */

/* Reads ip=A.B.C.D/len and gw=A.B.C.D from plat_cmdline() and the MAC from
 * plat_net_mac().  Returns 0, or -1 when the command line has no valid ip=. */
int net_init(void);

/* Fires due timers, then processes queued frames one at a time, each
 * followed by its callbacks and the resulting output. */
void net_poll(void);

/* The earliest monotonic time at which net_poll() has timer work to do
 * (UINT64_MAX when none). */
uint64_t net_next_deadline(void);

uint32_t net_ip(void);

/* plat_now_ns() as read at the start of the current net_poll().  Using it
 * instead of the platform clock keeps the whole program to one clock read
 * per loop iteration, which is what a record/replay or COLO run must match. */
uint64_t net_clock(void);

/* ---- TCP ---- */

typedef struct tcp_conn tcp_conn;

enum {
    TCP_EV_READABLE = 1,   /* new data is ready for tcp_recv */
    TCP_EV_WRITABLE = 2,   /* send buffer space became free */
    TCP_EV_PEER_FIN = 4,   /* the peer closed its side; no more data will arrive */
    TCP_EV_RESET    = 8,   /* connection aborted (RST or retransmission timeout);
                              the handle is freed when the callback returns */
};

typedef void (*tcp_event_fn)(tcp_conn *c, unsigned events, void *user);
/* Called for each newly established connection on a listening port.  The
 * callback must install event handlers with tcp_set_handler (or tcp_close). */
typedef void (*tcp_accept_fn)(tcp_conn *c, void *arg);

/* Maximum simultaneous connections (all states, including TIME_WAIT). */
#define TCP_MAX_CONNS 128

int tcp_listen(uint16_t port, tcp_accept_fn on_accept, void *arg);
void tcp_set_handler(tcp_conn *c, tcp_event_fn fn, void *user);

/* Copies up to cap received bytes; returns the count (0 when none). */
size_t tcp_recv(tcp_conn *c, void *buf, size_t cap);
/* Queues up to len bytes; returns how many fit (0 when the send buffer is
 * full: wait for TCP_EV_WRITABLE).  Transmits as the peer's window allows. */
size_t tcp_send(tcp_conn *c, const void *buf, size_t len);
size_t tcp_send_space(const tcp_conn *c);
/* Bytes queued but not yet acknowledged by the peer. */
size_t tcp_send_pending(const tcp_conn *c);
/* Graceful close: queued data is sent, then FIN.  The handle is no longer
 * the application's after this call and no more callbacks arrive. */
void tcp_close(tcp_conn *c);
/* Sends RST and frees the connection immediately. */
void tcp_abort(tcp_conn *c);
void tcp_peer(const tcp_conn *c, uint32_t *ip, uint16_t *port);

/* ---- UDP ---- */

typedef void (*udp_recv_fn)(uint32_t src_ip, uint16_t src_port, uint16_t dst_port,
                            const uint8_t *data, size_t len, void *arg);
#define UDP_MAX_BINDS 8
int udp_bind(uint16_t port, udp_recv_fn fn, void *arg);
/* Returns 0 when sent or queued behind ARP resolution, -1 otherwise. */
int udp_sendto(uint16_t src_port, uint32_t dst_ip, uint16_t dst_port,
               const void *data, size_t len);

/* ---- small helpers shared with the application ---- */

/* Finds key=value in a "k=v k=v" string; copies the value (NUL terminated).
 * Returns the value's length, or -1 when the key is absent or too long. */
int cmdline_get(const char *cmdline, const char *key, char *out, size_t cap);
/* Parses dotted-quad; returns the end of the address or NULL. */
const char *parse_ipv4(const char *s, uint32_t *ip);

/* Minimal snprintf: %s %c %d %u %x %ld %lu %lx %lld %llu %llx %zu %%, a zero-pad
 * width for integers (%02x), and %I
 * for an IPv4 address (uint32_t).  Always NUL terminates; returns the length
 * that would have been written. */
size_t fmt_vsn(char *buf, size_t cap, const char *fmt, va_list ap);
size_t fmt_sn(char *buf, size_t cap, const char *fmt, ...);
/* Formatted console line (truncated at 255 bytes). */
void net_log(const char *fmt, ...);

#endif
