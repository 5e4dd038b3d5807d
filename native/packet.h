/*
 * Ethernet frames parsed for the COLO network layer, in C: the twin of
 * netfilter/packet.py's parse() (and native/reference.py's parse_headers), with the
 * same classes and the same verdicts on malformed frames.  Header-only: the comparer,
 * the rewriter and the datapath loops each include it.
 *
 *   Ethernet   dst(6) src(6) type(2); 802.1Q/QinQ tags (0x8100, 0x88a8, up to two) skipped
 *   IPv4       ver|ihl tos totlen ident flags|frag ttl proto cksum src dst [options]
 *   TCP        sport dport seq ack doff|rsvd flags window cksum urgent [options]
 *   UDP        sport dport length cksum        ICMP  type code cksum ident seq
 */
#ifndef COLO_PACKET_H
#define COLO_PACKET_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Flow classes, as netfilter.compare.FLOW_CLASSES orders them. */
enum pkt_flow { PKT_TCP, PKT_UDP, PKT_ICMP, PKT_OTHER, PKT_NON_IP, PKT_FLOWS };

enum { PKT_FIN = 0x01, PKT_SYN = 0x02, PKT_RST = 0x04, PKT_PSH = 0x08, PKT_ACK = 0x10 };

typedef struct {
    enum pkt_flow flow;      /* the class; for a malformed frame, the class parsing reached */
    int malformed;           /* 1: too short or inconsistent (only flow is meaningful then) */
    unsigned ethertype;
    size_t ip;               /* offset of the IPv4 header */
    size_t transport;        /* offset of the transport header (ip + ihl) */
    size_t ip_end;           /* ip + total length: Ethernet padding lies beyond */
    unsigned protocol, flags_offset;
    uint32_t src, dst;       /* host order */
    /* TCP */
    unsigned sport, dport;   /* UDP too; ICMP echo: both the ident; other: 0 */
    uint32_t seq, ack;
    unsigned header_length, tcp_flags;
    size_t payload, payload_len;   /* TCP: after the header up to ip_end; UDP: after 8 bytes, length-8 */
    /* ICMP */
    unsigned icmp_type;
    int echo;                /* ICMP echo request or reply */
} pkt_info;

static inline unsigned pkt_be16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static inline uint32_t pkt_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void pkt_put_be16(uint8_t *p, unsigned v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void pkt_put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Parses `frame`; returns 0, or -1 when malformed (out->flow then says which class parsing
 * reached, as PacketError.flow_class does).  A frame that is not IPv4 is not malformed:
 * flow PKT_NON_IP, only ethertype and ip set. */
static inline int pkt_parse(const uint8_t *p, size_t n, pkt_info *out)
{
    memset(out, 0, sizeof *out);
    out->flow = PKT_NON_IP;
    out->malformed = 1;
    if (n < 14)
        return -1;
    size_t off = 12;
    unsigned ethertype = pkt_be16(p + off);
    for (int tags = 0; tags < 2 && (ethertype == 0x8100 || ethertype == 0x88A8); tags++) {
        off += 4;
        if (n < off + 2)
            return -1;
        ethertype = pkt_be16(p + off);
    }
    out->ethertype = ethertype;
    out->ip = off + 2;
    if (ethertype != 0x0800) {
        out->malformed = 0;
        return 0;
    }
    size_t available = n - out->ip;
    if (available < 20)
        return -1;
    const uint8_t *h = p + out->ip;
    size_t ihl = (size_t)(h[0] & 0x0F) * 4, total = pkt_be16(h + 2);
    if (h[0] >> 4 != 4 || ihl < 20 || ihl > available || total < ihl || total > available)
        return -1;
    out->protocol = h[9];
    out->flags_offset = pkt_be16(h + 6);
    out->src = pkt_be32(h + 12);
    out->dst = pkt_be32(h + 16);
    out->transport = out->ip + ihl;
    out->ip_end = out->ip + total;
    const uint8_t *t = p + out->transport;
    size_t room = total - ihl;
    out->flow = PKT_OTHER;
    if (out->flags_offset & 0x3FFF) {           /* a fragment: compared whole */
        out->malformed = 0;
        return 0;
    }
    if (out->protocol == 6) {
        out->flow = PKT_TCP;
        if (room < 20)
            return -1;
        size_t header_length = (size_t)(t[12] >> 4) * 4;
        if (header_length < 20 || header_length > room)
            return -1;
        out->sport = pkt_be16(t);
        out->dport = pkt_be16(t + 2);
        out->seq = pkt_be32(t + 4);
        out->ack = pkt_be32(t + 8);
        out->header_length = (unsigned)header_length;
        out->tcp_flags = t[13];
        out->payload = out->transport + header_length;
        out->payload_len = room - header_length;
    } else if (out->protocol == 17) {
        out->flow = PKT_UDP;
        if (room < 8)
            return -1;
        size_t length = pkt_be16(t + 4);
        if (length < 8 || length > room)
            return -1;
        out->sport = pkt_be16(t);
        out->dport = pkt_be16(t + 2);
        out->payload = out->transport + 8;
        out->payload_len = length - 8;
    } else if (out->protocol == 1) {
        out->flow = PKT_ICMP;
        if (room < 8)
            return -1;
        out->icmp_type = t[0];
        out->echo = t[0] == 0 || t[0] == 8;
        if (out->echo)
            out->sport = out->dport = pkt_be16(t + 4);
        out->payload = out->transport + 8;
        out->payload_len = room - 8;
    }
    out->malformed = 0;
    return 0;
}

/* The 16-bit one's complement sum (RFC 1071) of len bytes, added to `sum` (not folded). */
static inline uint64_t pkt_sum(const uint8_t *p, size_t len, uint64_t sum)
{
    size_t i = 0;
    for (; i + 1 < len; i += 2)
        sum += pkt_be16(p + i);
    if (i < len)
        sum += (unsigned)p[i] << 8;
    return sum;
}

static inline unsigned pkt_fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (unsigned)sum;
}

/* Writes the right TCP checksum into a parsed TCP frame whose TCP header or payload changed
 * (netfilter.packet.fill_tcp_checksum). */
static inline void pkt_fill_tcp_checksum(uint8_t *p, const pkt_info *k)
{
    size_t start = k->transport, len = k->ip_end - start;
    uint8_t *t = p + start;
    uint64_t sum = pkt_sum(p + k->ip + 12, 8, 0) + 6 + len;     /* pseudo header */
    t[16] = t[17] = 0;
    sum = pkt_sum(t, len, sum);
    pkt_put_be16(t + 16, ~pkt_fold(sum) & 0xFFFF);
}

#endif
