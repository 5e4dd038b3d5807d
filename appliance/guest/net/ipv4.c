/* IPv4: header validation, no fragmentation (fragments are dropped). */
#include "netif.h"

static uint16_t ip_id;

void ipv4_input(const uint8_t *p, size_t len)
{
    if (len < IP_HLEN || (p[0] >> 4) != 4)
        return;
    size_t hlen = (size_t)(p[0] & 0xf) * 4;
    size_t tot = get16(p + 2);
    if (hlen < IP_HLEN || tot < hlen || tot > len)
        return;
    if (csum_fold(csum_add(0, p, hlen)) != 0)
        return;
    /* MF set or a non-zero offset: a fragment, which we do not reassemble. */
    if (get16(p + 6) & 0x3fff)
        return;
    uint32_t src = get32(p + 12), dst = get32(p + 16);
    uint32_t bcast = net_cfg.ip | ~net_cfg.mask;
    bool to_us = dst == net_cfg.ip;
    if (!to_us && dst != bcast && dst != 0xffffffffu)
        return;
    const uint8_t *l4 = p + hlen;
    size_t l4len = tot - hlen; /* the frame may carry Ethernet padding after tot */
    switch (p[9]) {
    case IPPROTO_ICMP:
        if (to_us)
            icmp_input(src, l4, l4len);
        break;
    case IPPROTO_UDP:
        udp_input(src, dst, l4, l4len);
        break;
    case IPPROTO_TCP:
        if (to_us)
            tcp_input(src, dst, l4, l4len);
        break;
    }
}

int ipv4_output(uint32_t dst, uint8_t proto, size_t l4len)
{
    if (l4len > L4_MAX)
        return -1;
    uint8_t *h = net_txbuf + ETH_HLEN;
    h[0] = 0x45;
    h[1] = 0;
    put16(h + 2, (uint16_t)(IP_HLEN + l4len));
    put16(h + 4, ip_id++);
    put16(h + 6, 0x4000); /* DF: we never fragment */
    h[8] = 64;
    h[9] = proto;
    put16(h + 10, 0);
    put32(h + 12, net_cfg.ip);
    put32(h + 16, dst);
    put16(h + 10, csum_fold(csum_add(0, h, IP_HLEN)));
    bool local = ((dst ^ net_cfg.ip) & net_cfg.mask) == 0 || dst == 0xffffffffu;
    uint32_t hop = local || !net_cfg.gw ? dst : net_cfg.gw;
    return arp_output_ip(net_txbuf, ETH_HLEN + IP_HLEN + l4len, hop);
}
