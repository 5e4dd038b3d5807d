/*
 * TCP (RFC 793/9293 with RFC 6298 retransmission timing, RFC 5681 fast
 * retransmit and RFC 6582 NewReno partial-ACK recovery, plus a short
 * recovery timer that resends a lost retransmission before the RTO would).
 * Passive open only.
 *
 * Buffers are rings: the send ring holds bytes from s_seq (acked bytes are
 * dropped from its head); the receive ring holds in-order bytes not yet read
 * by the application, and out-of-order bytes are written at their final
 * place beyond them, with the held ranges listed in ooo[].
 *
 * As a receiver it reports held out-of-order ranges with SACK (RFC 2018) so
 * the peer repairs several holes per round trip; as a sender it ignores SACK.
 * No window scaling or timestamps: windows are at most 65535 bytes.
 * No congestion control beyond loss recovery: the peers are on a LAN.
 */
#include "netif.h"

#define TCP_MSS        1460
#define SNDBUF         (64u * 1024)
#define RCVBUF         (64u * 1024)
#define MAX_WIN        65535u
#define OOO_MAX        8
#define MAX_LISTEN     8
#define NS_PER_MS      1000000ull
#define RTO_INIT       (1000 * NS_PER_MS)
#define RTO_MIN        (200 * NS_PER_MS)   /* Linux's floor, not RFC 6298's 1 s */
#define RTO_MAX        (60000 * NS_PER_MS)
#define CLOCK_G        NS_PER_MS
#define REC_TIMER_MIN  (10 * NS_PER_MS)
#define REC_PROBES     4
#define MAX_RETRIES    10
#define SYN_RETRIES    5
#define TIME_WAIT_NS   (2000 * NS_PER_MS)  /* short: peers are local, ISNs move on */
#define FIN_WAIT2_NS   (30000 * NS_PER_MS)

#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_PSH 0x08
#define F_ACK 0x10

#define SEQ_LT(a, b) ((int32_t)((a) - (b)) < 0)
#define SEQ_LE(a, b) ((int32_t)((a) - (b)) <= 0)
#define SEQ_GT(a, b) ((int32_t)((a) - (b)) > 0)
#define SEQ_GE(a, b) ((int32_t)((a) - (b)) >= 0)

enum tcp_state {
    CLOSED, SYN_RCVD, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2,
    CLOSE_WAIT, CLOSING, LAST_ACK, TIME_WAIT,
};

struct listener {
    uint16_t port;
    tcp_accept_fn fn;
    void *arg;
};

struct range {
    uint32_t start, end;
};

struct tcp_conn {
    bool used;            /* slot allocated (state may be CLOSED while dead) */
    bool dead;            /* aborted: freed by the next dispatch */
    uint8_t state;
    uint32_t lip, rip;
    uint16_t lport, rport;
    struct listener *lst;

    /* send side */
    uint32_t iss, snd_una, snd_nxt, snd_max, snd_wnd, snd_wl1, snd_wl2;
    uint16_t mss;
    bool sack_ok;         /* the peer offered SACK-permitted */
    uint8_t *sbuf;
    uint32_t s_head, s_len, s_seq;
    bool fin_queued;
    uint32_t fin_seq;

    /* receive side */
    uint32_t rcv_nxt, rcv_adv;
    uint8_t *rbuf;
    uint32_t r_head, r_len;
    struct range ooo[OOO_MAX];   /* most recently changed first (RFC 2018) */
    int n_ooo;

    /* timers (monotonic ns; 0 = off) */
    uint64_t rto, srtt, rttvar;
    bool have_rtt, rtt_active;
    uint32_t rtt_seq;
    uint64_t rtt_start;
    uint64_t rtx_deadline, state_deadline;
    uint8_t retries;
    uint8_t dupacks;
    bool in_recovery;
    uint8_t rec_probes;   /* recovery-timer resends of the same hole */
    uint32_t recover;

    bool ack_pending;
    bool accept_pending;
    bool app_owned;
    bool app_closed;      /* tcp_close/abort called: received data is discarded */
    unsigned events;
    tcp_event_fn fn;
    void *user;
};

static struct tcp_conn conns[TCP_MAX_CONNS];
static struct listener listeners[MAX_LISTEN];
static uint32_t isn_counter;

static uint32_t min32(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* ---- helpers ---- */

static uint32_t rcv_wnd(const struct tcp_conn *c)
{
    return min32(RCVBUF - c->r_len, MAX_WIN);
}

/* ISN: a keyed mix of the 4-tuple plus a per-stack counter and a 4 us clock
 * (RFC 6528 without the secret randomness, so primary and secondary agree). */
static uint32_t make_isn(uint32_t lip, uint16_t lport, uint32_t rip, uint16_t rport)
{
    uint64_t h = 0x9e3779b97f4a7c15ull;
    uint64_t words[3] = { lip, rip, (uint64_t)lport << 16 | rport };
    for (int i = 0; i < 3; i++) {
        h ^= words[i];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 33;
    }
    return (uint32_t)h + (uint32_t)(net_now / 4000) + (isn_counter++ << 16);
}

static void ring_write(uint8_t *ring, uint32_t size, uint32_t pos, const uint8_t *src, uint32_t n)
{
    pos %= size;
    uint32_t first = min32(n, size - pos);
    memcpy(ring + pos, src, first);
    memcpy(ring, src + first, n - first);
}

static void ring_read(const uint8_t *ring, uint32_t size, uint32_t pos, uint8_t *dst, uint32_t n)
{
    pos %= size;
    uint32_t first = min32(n, size - pos);
    memcpy(dst, ring + pos, first);
    memcpy(dst + first, ring, n - first);
}

/* Builds and sends one segment.  c supplies the options and the data (n
 * bytes at send-ring offset off); it is NULL for an RST with no connection. */
static void xmit(uint32_t src, uint16_t sport, uint32_t dst, uint16_t dport, uint32_t seq,
                 uint32_t ack, uint8_t flags, uint16_t wnd, const struct tcp_conn *c,
                 uint32_t off, uint32_t n)
{
    uint8_t *t = L4_TX;
    size_t hlen = 20;
    if (c && (flags & F_SYN)) {
        t[hlen++] = 2; /* MSS */
        t[hlen++] = 4;
        put16(t + hlen, TCP_MSS);
        hlen += 2;
        if (c->sack_ok) {
            static const uint8_t sack_perm[4] = { 1, 1, 4, 2 };
            memcpy(t + hlen, sack_perm, 4);
            hlen += 4;
        }
    } else if (c && c->sack_ok && c->n_ooo && n == 0 && !(flags & (F_FIN | F_RST))) {
        /* SACK blocks on pure ACKs only, so data segments keep a full MSS. */
        int blocks = c->n_ooo < 4 ? c->n_ooo : 4;
        t[hlen++] = 1;
        t[hlen++] = 1;
        t[hlen++] = 5;
        t[hlen++] = (uint8_t)(2 + 8 * blocks);
        for (int i = 0; i < blocks; i++, hlen += 8) {
            put32(t + hlen, c->ooo[i].start);
            put32(t + hlen + 4, c->ooo[i].end);
        }
    }
    put16(t, sport);
    put16(t + 2, dport);
    put32(t + 4, seq);
    put32(t + 8, (flags & F_ACK) ? ack : 0);
    t[12] = (uint8_t)(hlen / 4 << 4);
    t[13] = flags;
    put16(t + 14, wnd);
    put16(t + 16, 0);
    put16(t + 18, 0);
    if (n)
        ring_read(c->sbuf, SNDBUF, c->s_head + off, t + hlen, n);
    size_t len = hlen + n;
    put16(t + 16, csum_fold(csum_add(csum_pseudo(src, dst, IPPROTO_TCP, len), t, len)));
    ipv4_output(dst, IPPROTO_TCP, len);
}

static void send_seg(struct tcp_conn *c, uint32_t seq, uint8_t flags, uint32_t off, uint32_t n)
{
    uint32_t wnd = rcv_wnd(c);
    xmit(c->lip, c->lport, c->rip, c->rport, seq, c->rcv_nxt, flags | F_ACK, (uint16_t)wnd, c, off, n);
    c->rcv_adv = c->rcv_nxt + wnd;
    c->ack_pending = false;
}

static void send_synack(struct tcp_conn *c)
{
    send_seg(c, c->iss, F_SYN, 0, 0);
}

static void rtx_arm(struct tcp_conn *c)
{
    c->rtx_deadline = net_now + c->rto;
}

static void conn_free(struct tcp_conn *c)
{
    free(c->sbuf);
    free(c->rbuf);
    memset(c, 0, sizeof *c);
}

/* Connection is gone: tell the application if it holds the handle. */
static void conn_kill(struct tcp_conn *c)
{
    c->state = CLOSED;
    c->dead = true;
    c->rtx_deadline = c->state_deadline = 0;
    c->ack_pending = false;
    if (c->app_owned)
        c->events |= TCP_EV_RESET;
}

static void send_rst(struct tcp_conn *c)
{
    xmit(c->lip, c->lport, c->rip, c->rport, c->snd_nxt, c->rcv_nxt, F_RST | F_ACK, 0, NULL, 0, 0);
}

static void enter_time_wait(struct tcp_conn *c)
{
    c->state = TIME_WAIT;
    c->rtx_deadline = 0;
    c->state_deadline = net_now + TIME_WAIT_NS;
}

/* ---- output ---- */

static void tcp_output(struct tcp_conn *c, bool force_ack)
{
    switch (c->state) {
    case ESTABLISHED: case CLOSE_WAIT: case FIN_WAIT_1: case CLOSING: case LAST_ACK:
        break;
    case FIN_WAIT_2: case TIME_WAIT:
        if (force_ack)
            send_seg(c, c->snd_nxt, 0, 0, 0);
        return;
    default:
        return;
    }
    uint64_t now = net_now;
    bool sent = false;
    for (;;) {
        uint32_t off = c->snd_nxt - c->s_seq;
        uint32_t avail = off < c->s_len ? c->s_len - off : 0;
        uint32_t inflight = c->snd_nxt - c->snd_una;
        uint32_t usable = c->snd_wnd > inflight ? c->snd_wnd - inflight : 0;
        uint32_t n = min32(min32(avail, usable), c->mss);
        bool fin = c->fin_queued && c->snd_nxt + n == c->fin_seq;
        if (n == 0 && !fin)
            break;
        send_seg(c, c->snd_nxt, (uint8_t)((n ? F_PSH : 0) | (fin ? F_FIN : 0)), off, n);
        if (!c->rtt_active && SEQ_GE(c->snd_nxt, c->snd_max)) {
            /* Karn: time only new data, never a retransmission. */
            c->rtt_active = true;
            c->rtt_seq = c->snd_nxt + n + fin;
            c->rtt_start = now;
        }
        c->snd_nxt += n + fin;
        if (SEQ_GT(c->snd_nxt, c->snd_max))
            c->snd_max = c->snd_nxt;
        if (!c->rtx_deadline)
            rtx_arm(c);
        sent = true;
        if (fin)
            break;
    }
    if (!sent && (force_ack || c->ack_pending))
        send_seg(c, c->snd_nxt, 0, 0, 0);
    /* Persist: data waits on a zero window and nothing in flight will
     * bring an ACK, so the timer must probe. */
    if (c->snd_wnd == 0 && c->s_len > c->snd_nxt - c->s_seq && c->snd_una == c->snd_max &&
        !c->rtx_deadline)
        rtx_arm(c);
}

/* While recovering, a resent hole that stays unacknowledged for a few RTTs
 * was most likely lost again: nothing else is in flight to produce duplicate
 * ACKs, so without this only the (backed-off) RTO would notice. */
static uint64_t recovery_timeout(const struct tcp_conn *c)
{
    uint64_t t = 2 * c->srtt + 4 * c->rttvar;
    if (t < REC_TIMER_MIN)
        t = REC_TIMER_MIN;
    return t < c->rto ? t : c->rto;
}

/* Resends the first unacknowledged segment (fast retransmit, NewReno). */
static void retransmit_first(struct tcp_conn *c)
{
    uint32_t off = c->snd_una - c->s_seq;
    uint32_t avail = off < c->s_len ? c->s_len - off : 0;
    uint32_t n = min32(avail, c->mss);
    bool fin = c->fin_queued && c->snd_una + n == c->fin_seq;
    if (n == 0 && !fin)
        return;
    send_seg(c, c->snd_una, (uint8_t)((n ? F_PSH : 0) | (fin ? F_FIN : 0)), off, n);
    c->rtt_active = false;
    c->rtx_deadline = net_now + (c->in_recovery ? recovery_timeout(c) : c->rto);
}

/* ---- input ---- */

static struct tcp_conn *find_conn(uint32_t lip, uint16_t lport, uint32_t rip, uint16_t rport)
{
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        struct tcp_conn *c = &conns[i];
        if (c->used && !c->dead && c->lport == lport && c->rport == rport && c->rip == rip &&
            c->lip == lip)
            return c;
    }
    return NULL;
}

static struct tcp_conn *alloc_conn(void)
{
    struct tcp_conn *oldest_tw = NULL;
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        struct tcp_conn *c = &conns[i];
        if (!c->used)
            return c;
        if (c->state == TIME_WAIT &&
            (!oldest_tw || c->state_deadline < oldest_tw->state_deadline))
            oldest_tw = c;
    }
    /* Full: recycle the TIME_WAIT slot closest to expiry. */
    if (oldest_tw)
        conn_free(oldest_tw);
    return oldest_tw;
}

/* RST in answer to a segment that belongs to no connection (RFC 793 p.36). */
static void reset_unknown(uint32_t src, uint32_t dst, const uint8_t *t, uint32_t seglen)
{
    uint8_t flags = t[13];
    if (flags & F_RST)
        return;
    if (flags & F_ACK)
        xmit(dst, get16(t + 2), src, get16(t), get32(t + 8), 0, F_RST, 0, NULL, 0, 0);
    else
        xmit(dst, get16(t + 2), src, get16(t), 0, get32(t + 4) + seglen, F_RST | F_ACK, 0, NULL, 0, 0);
}

/* SYN options we use: MSS and SACK-permitted. */
static uint16_t parse_syn_options(const uint8_t *opt, size_t len, bool *sack_ok)
{
    uint16_t mss = 536; /* RFC 9293 default */
    size_t i = 0;
    while (i < len) {
        uint8_t kind = opt[i];
        if (kind == 0)
            break;
        if (kind == 1) {
            i++;
            continue;
        }
        if (i + 1 >= len || opt[i + 1] < 2 || i + opt[i + 1] > len)
            break;
        if (kind == 2 && opt[i + 1] == 4)
            mss = get16(opt + i + 2);
        else if (kind == 4 && opt[i + 1] == 2)
            *sack_ok = true;
        i += opt[i + 1];
    }
    return mss;
}

static void passive_open(struct listener *l, uint32_t src, uint32_t dst, const uint8_t *t,
                         size_t doff)
{
    struct tcp_conn *c = alloc_conn();
    if (!c)
        return; /* like a full backlog: the client retries its SYN */
    uint8_t *sb = malloc(SNDBUF), *rb = malloc(RCVBUF);
    if (!sb || !rb) {
        free(sb);
        free(rb);
        return;
    }
    memset(c, 0, sizeof *c);
    c->used = true;
    c->state = SYN_RCVD;
    c->lst = l;
    c->lip = dst;
    c->rip = src;
    c->lport = get16(t + 2);
    c->rport = get16(t);
    c->sbuf = sb;
    c->rbuf = rb;
    c->rcv_nxt = get32(t + 4) + 1;
    c->iss = make_isn(c->lip, c->lport, c->rip, c->rport);
    c->snd_una = c->iss;
    c->snd_nxt = c->snd_max = c->iss + 1;
    c->s_seq = c->iss + 1;
    c->snd_wnd = get16(t + 14);
    c->snd_wl1 = get32(t + 4);
    uint16_t mss = parse_syn_options(t + 20, doff - 20, &c->sack_ok);
    c->mss = mss < 64 ? 64 : mss > TCP_MSS ? TCP_MSS : mss;
    c->rto = RTO_INIT;
    c->rtt_active = true;
    c->rtt_seq = c->iss + 1;
    c->rtt_start = net_now;
    send_synack(c);
    rtx_arm(c);
}

static void rtt_sample(struct tcp_conn *c, uint64_t r)
{
    if (!c->have_rtt) {
        c->srtt = r;
        c->rttvar = r / 2;
        c->have_rtt = true;
    } else {
        uint64_t d = c->srtt > r ? c->srtt - r : r - c->srtt;
        c->rttvar = (3 * c->rttvar + d) / 4;
        c->srtt = (7 * c->srtt + r) / 8;
    }
    uint64_t var = 4 * c->rttvar;
    c->rto = c->srtt + (var > CLOCK_G ? var : CLOCK_G);
    if (c->rto < RTO_MIN)
        c->rto = RTO_MIN;
    if (c->rto > RTO_MAX)
        c->rto = RTO_MAX;
}

static void ooo_remove(struct tcp_conn *c, int i)
{
    c->n_ooo--;
    memmove(&c->ooo[i], &c->ooo[i + 1], (size_t)(c->n_ooo - i) * sizeof c->ooo[0]);
}

/* Merges [s,e) into the out-of-order list, which stays a set of disjoint,
 * non-touching ranges; false when it cannot be held. */
static bool ooo_add(struct tcp_conn *c, uint32_t s, uint32_t e)
{
    struct range n = { s, e };
    for (int i = 0; i < c->n_ooo;) {
        struct range *r = &c->ooo[i];
        if (SEQ_LE(n.start, r->end) && SEQ_GE(n.end, r->start)) {
            if (SEQ_LT(r->start, n.start))
                n.start = r->start;
            if (SEQ_GT(r->end, n.end))
                n.end = r->end;
            ooo_remove(c, i);
        } else {
            i++;
        }
    }
    if (c->n_ooo == OOO_MAX)
        return false;
    memmove(&c->ooo[1], &c->ooo[0], (size_t)c->n_ooo * sizeof c->ooo[0]);
    c->ooo[0] = n;
    c->n_ooo++;
    return true;
}

/* After rcv_nxt advanced, absorb held ranges that are now contiguous. */
static void ooo_absorb(struct tcp_conn *c)
{
    for (int i = 0; i < c->n_ooo; i++) {
        struct range *r = &c->ooo[i];
        if (SEQ_LE(r->start, c->rcv_nxt)) {
            if (SEQ_GT(r->end, c->rcv_nxt)) {
                c->r_len += r->end - c->rcv_nxt;
                c->rcv_nxt = r->end;
            }
            ooo_remove(c, i);
            i = -1; /* restart: another range may now be contiguous */
        }
    }
}

/* Accepts the segment's data (and FIN); returns true when an immediate
 * ACK is due (out of order data or a FIN), false to let it ride with the
 * application's reply. */
static bool receive_data(struct tcp_conn *c, uint32_t seq, const uint8_t *data, uint32_t dlen,
                         bool fin)
{
    if (SEQ_LT(seq, c->rcv_nxt)) {
        uint32_t skip = c->rcv_nxt - seq;
        if (skip > dlen)
            return true; /* a duplicate, FIN included */
        data += skip;
        dlen -= skip;
        seq = c->rcv_nxt;
    }
    uint32_t free_space = RCVBUF - c->r_len;
    uint32_t off = seq - c->rcv_nxt;
    if (dlen && off >= free_space)
        return true;
    if (dlen > free_space - off) {
        dlen = free_space - off;
        fin = false;
    }
    bool urgent_ack = false;
    if (dlen) {
        ring_write(c->rbuf, RCVBUF, c->r_head + c->r_len + off, data, dlen);
        if (off == 0) {
            bool filled_hole = c->n_ooo > 0;
            c->rcv_nxt += dlen;
            c->r_len += dlen;
            ooo_absorb(c);
            c->events |= TCP_EV_READABLE;
            urgent_ack = filled_hole;
            if (c->app_closed) {
                /* Nobody will read it: keep the window open so the peer can
                 * finish and close. */
                c->r_head = (c->r_head + c->r_len) % RCVBUF;
                c->r_len = 0;
            }
        } else {
            ooo_add(c, seq, seq + dlen);
            return true; /* duplicate ACK tells the sender about the hole */
        }
    }
    if (fin) {
        /* Taken only in order; an early FIN is dropped and comes again. */
        if (seq + dlen == c->rcv_nxt) {
            c->rcv_nxt++;
            c->events |= TCP_EV_PEER_FIN;
            switch (c->state) {
            case ESTABLISHED:
                c->state = CLOSE_WAIT;
                break;
            case FIN_WAIT_1:
                c->state = CLOSING;
                break;
            case FIN_WAIT_2:
                enter_time_wait(c);
                break;
            }
        }
        urgent_ack = true;
    }
    return urgent_ack;
}

static void process_ack(struct tcp_conn *c, uint32_t seq, uint32_t ack, uint32_t wnd, bool pure)
{
    uint64_t now = net_now;
    if (SEQ_GT(ack, c->snd_una)) {
        uint32_t d = ack - c->s_seq;
        if (d > c->s_len)
            d = c->s_len; /* the rest acknowledges our FIN */
        c->s_head = (c->s_head + d) % SNDBUF;
        c->s_len -= d;
        c->s_seq += d;
        c->snd_una = ack;
        if (SEQ_LT(c->snd_nxt, ack))
            c->snd_nxt = ack;
        if (c->rtt_active && SEQ_GE(ack, c->rtt_seq)) {
            c->rtt_active = false;
            rtt_sample(c, now - c->rtt_start);
        }
        c->retries = 0;
        c->dupacks = 0;
        c->rec_probes = 0;
        if (d)
            c->events |= TCP_EV_WRITABLE;
        c->rtx_deadline = c->snd_una == c->snd_max ? 0 : now + c->rto;
        if (c->in_recovery) {
            if (SEQ_GE(ack, c->recover))
                c->in_recovery = false;
            else
                retransmit_first(c); /* NewReno partial ACK: the next hole */
        }
    } else if (ack == c->snd_una && pure && wnd == c->snd_wnd && c->snd_una != c->snd_max) {
        if (++c->dupacks == 3 && !c->in_recovery) {
            c->in_recovery = true;
            c->recover = c->snd_max;
            retransmit_first(c);
        }
    }
    if (SEQ_LT(c->snd_wl1, seq) || (c->snd_wl1 == seq && SEQ_LE(c->snd_wl2, ack))) {
        c->snd_wnd = wnd;
        c->snd_wl1 = seq;
        c->snd_wl2 = ack;
    }
}

void tcp_input(uint32_t src, uint32_t dst, const uint8_t *t, size_t len)
{
    if (len < 20)
        return;
    size_t doff = (size_t)(t[12] >> 4) * 4;
    if (doff < 20 || doff > len)
        return;
    if (csum_fold(csum_add(csum_pseudo(src, dst, IPPROTO_TCP, len), t, len)) != 0)
        return;
    uint16_t sport = get16(t), dport = get16(t + 2);
    uint32_t seq = get32(t + 4), ack = get32(t + 8);
    uint8_t flags = t[13];
    uint32_t wnd = get16(t + 14);
    const uint8_t *data = t + doff;
    uint32_t dlen = (uint32_t)(len - doff);
    uint32_t seglen = dlen + !!(flags & F_SYN) + !!(flags & F_FIN);

    struct tcp_conn *c = find_conn(dst, dport, src, sport);
    if (c && c->state == TIME_WAIT && (flags & (F_SYN | F_ACK | F_RST)) == F_SYN &&
        SEQ_GT(seq, c->rcv_nxt)) {
        /* A new incarnation of the pair (RFC 9293 3.10.7.4 allows it). */
        conn_free(c);
        c = NULL;
    }
    if (!c) {
        if ((flags & (F_SYN | F_ACK | F_RST)) == F_SYN) {
            for (int i = 0; i < MAX_LISTEN; i++)
                if (listeners[i].fn && listeners[i].port == dport) {
                    passive_open(&listeners[i], src, dst, t, doff);
                    return;
                }
        }
        reset_unknown(src, dst, t, seglen);
        return;
    }

    if (c->state == SYN_RCVD && (flags & (F_SYN | F_ACK | F_RST)) == F_SYN) {
        if (seq + 1 == c->rcv_nxt)
            send_synack(c); /* our SYN-ACK was lost */
        return;
    }

    /* Sequence acceptability (RFC 9293 3.10.7.4, first check). */
    uint32_t rwnd = rcv_wnd(c);
    bool ok;
    if (seglen == 0)
        ok = seq == c->rcv_nxt ||
             (rwnd && SEQ_GE(seq, c->rcv_nxt) && SEQ_LT(seq, c->rcv_nxt + rwnd));
    else
        ok = rwnd && ((SEQ_GE(seq, c->rcv_nxt) && SEQ_LT(seq, c->rcv_nxt + rwnd)) ||
                      (SEQ_GE(seq + seglen - 1, c->rcv_nxt) &&
                       SEQ_LT(seq + seglen - 1, c->rcv_nxt + rwnd)));
    if (!ok) {
        if (!(flags & F_RST))
            send_seg(c, c->snd_nxt, 0, 0, 0);
        return;
    }
    if (flags & F_RST) {
        /* RFC 5961: only an exact match resets; in-window gets a challenge. */
        if (seq == c->rcv_nxt)
            conn_kill(c);
        else
            send_seg(c, c->snd_nxt, 0, 0, 0);
        return;
    }
    if (flags & F_SYN) {
        send_seg(c, c->snd_nxt, 0, 0, 0); /* challenge ACK (RFC 5961) */
        return;
    }
    if (!(flags & F_ACK))
        return;

    if (c->state == SYN_RCVD) {
        if (ack != c->iss + 1) {
            xmit(dst, dport, src, sport, ack, 0, F_RST, 0, NULL, 0, 0);
            return;
        }
        c->state = ESTABLISHED;
        c->snd_una = ack;
        c->snd_wnd = wnd;
        c->snd_wl1 = seq;
        c->snd_wl2 = ack;
        c->retries = 0;
        c->rtx_deadline = 0;
        if (c->rtt_active) {
            c->rtt_active = false;
            rtt_sample(c, net_now - c->rtt_start);
        }
        c->accept_pending = true;
    } else {
        if (SEQ_GT(ack, c->snd_max)) {
            send_seg(c, c->snd_nxt, 0, 0, 0);
            return;
        }
        process_ack(c, seq, ack, wnd, dlen == 0 && !(flags & F_FIN));
    }

    bool fin_acked = c->fin_queued && SEQ_GT(c->snd_una, c->fin_seq);
    switch (c->state) {
    case FIN_WAIT_1:
        if (fin_acked) {
            c->state = FIN_WAIT_2;
            c->state_deadline = net_now + FIN_WAIT2_NS;
        }
        break;
    case CLOSING:
        if (fin_acked)
            enter_time_wait(c);
        break;
    case LAST_ACK:
        if (fin_acked) {
            conn_free(c);
            return;
        }
        break;
    case TIME_WAIT:
        if (flags & F_FIN) {
            send_seg(c, c->snd_nxt, 0, 0, 0); /* our last ACK was lost */
            enter_time_wait(c);
        }
        return;
    }

    switch (c->state) {
    case ESTABLISHED: case FIN_WAIT_1: case FIN_WAIT_2:
        if (receive_data(c, seq, data, dlen, flags & F_FIN))
            tcp_output(c, true);
        else if (dlen)
            c->ack_pending = true;
        break;
    default:
        /* The peer already sent FIN: anything new is a retransmission. */
        if (seglen)
            send_seg(c, c->snd_nxt, 0, 0, 0);
        break;
    }
    /* Data the ACK allowed (window opened, ring freed) goes out in dispatch. */
}

/* ---- timers ---- */

uint64_t tcp_next_deadline(void)
{
    uint64_t d = UINT64_MAX;
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        const struct tcp_conn *c = &conns[i];
        if (!c->used)
            continue;
        if (c->dead || c->ack_pending || c->events || c->accept_pending)
            return 0;
        if (c->rtx_deadline && c->rtx_deadline < d)
            d = c->rtx_deadline;
        if (c->state_deadline && c->state_deadline < d)
            d = c->state_deadline;
    }
    return d;
}

static void rtx_timeout(struct tcp_conn *c, uint64_t now)
{
    c->rtx_deadline = 0;
    if (c->state == SYN_RCVD) {
        if (++c->retries > SYN_RETRIES) {
            conn_free(c); /* never accepted: the application has no handle */
            return;
        }
        c->rto = c->rto * 2 > RTO_MAX ? RTO_MAX : c->rto * 2;
        c->rtt_active = false;
        send_synack(c);
        c->rtx_deadline = now + c->rto;
        return;
    }
    bool outstanding = c->snd_una != c->snd_max;
    if (outstanding && c->in_recovery && c->rec_probes < REC_PROBES) {
        c->rec_probes++;
        retransmit_first(c);
        return;
    }
    if (outstanding && ++c->retries > MAX_RETRIES) {
        send_rst(c);
        conn_kill(c);
        return;
    }
    /* Back off and go back to the first unacknowledged byte.  A timer that
     * fires late (e.g. after a VM pause) counts as one expiry only. */
    c->rto = c->rto * 2 > RTO_MAX ? RTO_MAX : c->rto * 2;
    c->rtt_active = false;
    c->in_recovery = false;
    c->dupacks = 0;
    c->snd_nxt = c->snd_una;
    if (c->snd_wnd == 0) {
        /* Zero-window probe: one byte (or the FIN) regardless of the window. */
        uint32_t off = c->snd_nxt - c->s_seq;
        if (off < c->s_len) {
            send_seg(c, c->snd_nxt, 0, off, 1);
            c->snd_nxt++;
            if (SEQ_GT(c->snd_nxt, c->snd_max))
                c->snd_max = c->snd_nxt;
        }
        if (c->s_len)
            c->rtx_deadline = now + c->rto;
    }
    tcp_output(c, false);
}

void tcp_timers(uint64_t now)
{
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        struct tcp_conn *c = &conns[i];
        if (!c->used || c->dead)
            continue;
        if (c->state_deadline && now >= c->state_deadline) {
            if (c->state == TIME_WAIT || c->state == FIN_WAIT_2) {
                conn_free(c);
                continue;
            }
            c->state_deadline = 0;
        }
        if (c->rtx_deadline && now >= c->rtx_deadline)
            rtx_timeout(c, now);
    }
}

/* Callbacks run here, after a frame or the timers were processed, so the
 * application never re-enters the stack in the middle of a segment; then
 * the pending ACK rides on the reply, and data the peer's ACK allowed goes. */
void tcp_dispatch_events(void)
{
    for (int i = 0; i < TCP_MAX_CONNS; i++) {
        struct tcp_conn *c = &conns[i];
        if (!c->used)
            continue;
        if (c->accept_pending && !c->dead) {
            c->accept_pending = false;
            c->app_owned = true;
            c->lst->fn(c, c->lst->arg);
        }
        unsigned ev = c->events;
        c->events = 0;
        if (ev && c->app_owned && c->fn)
            c->fn(c, ev, c->user);
        if (c->dead) {
            conn_free(c);
            continue;
        }
        tcp_output(c, c->ack_pending);
    }
}

/* ---- application API ---- */

int tcp_listen(uint16_t port, tcp_accept_fn fn, void *arg)
{
    if (!port || !fn)
        return -1;
    for (int i = 0; i < MAX_LISTEN; i++)
        if (listeners[i].fn && listeners[i].port == port)
            return -1;
    for (int i = 0; i < MAX_LISTEN; i++)
        if (!listeners[i].fn) {
            listeners[i] = (struct listener){ port, fn, arg };
            return 0;
        }
    return -1;
}

void tcp_set_handler(tcp_conn *c, tcp_event_fn fn, void *user)
{
    c->fn = fn;
    c->user = user;
}

size_t tcp_recv(tcp_conn *c, void *buf, size_t cap)
{
    uint32_t n = (uint32_t)(cap < c->r_len ? cap : c->r_len);
    if (!n)
        return 0;
    ring_read(c->rbuf, RCVBUF, c->r_head, buf, n);
    c->r_head = (c->r_head + n) % RCVBUF;
    c->r_len -= n;
    /* Window update once the right edge moved by 2 MSS (RFC 9293 SWS rule). */
    if (c->rcv_nxt + rcv_wnd(c) - c->rcv_adv >= 2u * TCP_MSS)
        c->ack_pending = true;
    return n;
}

size_t tcp_send_space(const tcp_conn *c)
{
    if (c->dead || c->fin_queued || (c->state != ESTABLISHED && c->state != CLOSE_WAIT))
        return 0;
    return SNDBUF - c->s_len;
}

size_t tcp_send_pending(const tcp_conn *c)
{
    return c->s_len;
}

size_t tcp_send(tcp_conn *c, const void *buf, size_t len)
{
    size_t space = tcp_send_space(c);
    uint32_t n = (uint32_t)(len < space ? len : space);
    if (!n)
        return 0;
    ring_write(c->sbuf, SNDBUF, c->s_head + c->s_len, buf, n);
    c->s_len += n;
    tcp_output(c, false);
    return n;
}

void tcp_close(tcp_conn *c)
{
    c->app_owned = false;
    c->app_closed = true;
    c->r_head = (c->r_head + c->r_len) % RCVBUF; /* unread data is dropped */
    c->r_len = 0;
    c->fn = NULL;
    if (c->dead || c->fin_queued)
        return;
    switch (c->state) {
    case ESTABLISHED:
        c->state = FIN_WAIT_1;
        break;
    case CLOSE_WAIT:
        c->state = LAST_ACK;
        break;
    default:
        return;
    }
    c->fin_queued = true;
    c->fin_seq = c->s_seq + c->s_len;
    tcp_output(c, false);
}

void tcp_abort(tcp_conn *c)
{
    c->app_owned = false;
    c->app_closed = true;
    c->fn = NULL;
    if (c->dead)
        return;
    send_rst(c);
    conn_kill(c);
}

void tcp_peer(const tcp_conn *c, uint32_t *ip, uint16_t *port)
{
    *ip = c->rip;
    *port = c->rport;
}
