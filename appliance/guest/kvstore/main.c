/* kvstore's entry point and per-connection I/O: read, parse, execute,
 * write, with backpressure in both directions. */
#include "kvstore.h"

#define KV_PORT 6379
#define ECHO_PORT 7

static void client_free(struct client *cl)
{
    kv_client_gone(cl);
    free(cl->in.p);
    free(cl->out.p);
    free(cl->argv);
    free(cl);
}

/* Hands buffered output to TCP as far as its send buffer allows. */
static void flush_out(struct client *cl)
{
    while (cl->out_off < cl->out.len) {
        size_t n = tcp_send(cl->conn, cl->out.p + cl->out_off, cl->out.len - cl->out_off);
        if (!n)
            return;
        cl->out_off += n;
    }
    cl->out.len = cl->out_off = 0;
}

/* Parses and executes complete commands while output is not backed up. */
static void process_input(struct client *cl)
{
    while (!cl->close_after && cl->out.len - cl->out_off < KV_OUT_HIGH) {
        size_t used;
        long argc = resp_parse(cl, &used);
        if (argc > 0)
            kv_execute(cl, (size_t)argc);
        if (argc < 0 || used == 0)
            break;
        cl->in_off += used;
    }
    /* Drop the parsed prefix so the buffer holds one partial command. */
    if (cl->in_off) {
        memmove(cl->in.p, cl->in.p + cl->in_off, cl->in.len - cl->in_off);
        cl->in.len -= cl->in_off;
        cl->in_off = 0;
    }
}

static void service(struct client *cl)
{
    uint8_t chunk[4096];
    for (;;) {
        flush_out(cl);
        if (cl->close_after || cl->out.len - cl->out_off >= KV_OUT_HIGH)
            break; /* stop reading: TCP's window closes on the client */
        /* Take input in batches so a client pipelining faster than we
         * answer is held back by its TCP window, not by our memory. */
        size_t before = cl->in.len;
        size_t n;
        while (cl->in.len < before + KV_READ_BATCH && cl->in.len < KV_MAX_QUERY &&
               (n = tcp_recv(cl->conn, chunk, sizeof chunk)) > 0)
            buf_append(&cl->in, chunk, n);
        size_t out_before = cl->out.len;
        process_input(cl);
        if (cl->in.len >= KV_MAX_QUERY && !cl->close_after) {
            reply_error(cl, "ERR Protocol error: query buffer limit exceeded");
            cl->close_after = true;
        }
        if (cl->in.len == before && cl->out.len == out_before)
            break;
    }
    flush_out(cl);
}

static void on_event(tcp_conn *c, unsigned ev, void *user)
{
    struct client *cl = user;
    if (ev & TCP_EV_RESET) {
        client_free(cl);
        return;
    }
    if (ev & TCP_EV_PEER_FIN)
        cl->peer_fin = true;
    service(cl);
    if (cl->in.oom || cl->out.oom) {
        tcp_abort(c);
        client_free(cl);
        return;
    }
    /* Close once every reply is queued in TCP, after QUIT or an error or when
     * the client half-closed (a partial command left then is never finished). */
    if (cl->out.len == cl->out_off && (cl->close_after || cl->peer_fin)) {
        tcp_close(c);
        client_free(cl);
    }
}

static void on_accept(tcp_conn *c, void *arg)
{
    (void)arg;
    struct client *cl = calloc(1, sizeof *cl);
    if (!cl) {
        tcp_abort(c);
        return;
    }
    cl->conn = c;
    kv_client_init(cl);
    tcp_set_handler(c, on_event, cl);
}

static void on_echo(uint32_t src, uint16_t sport, uint16_t dport, const uint8_t *data,
                    size_t len, void *arg)
{
    (void)arg;
    udp_sendto(dport, src, sport, data, len);
}

int guest_main(void)
{
    if (net_init() < 0) {
        net_log("kvstore: need ip=A.B.C.D/len on the command line");
        return 1;
    }
    if (kv_init() < 0)
        return 1;
    if (tcp_listen(KV_PORT, on_accept, NULL) < 0 || udp_bind(ECHO_PORT, on_echo, NULL) < 0) {
        net_log("kvstore: cannot listen");
        return 1;
    }
    net_log("kvstore: listening on %I:%u", net_ip(), KV_PORT);
    for (;;) {
        uint64_t net_due = net_next_deadline(), sweep_due = kv_sweep_deadline();
        plat_poll(sweep_due < net_due ? sweep_due : net_due);
        net_poll();
        kv_sweep();
    }
}
