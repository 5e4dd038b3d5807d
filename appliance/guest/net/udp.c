/* UDP: port bindings with a receive callback, and sendto. */
#include "netif.h"

struct udp_bind {
    uint16_t port;
    udp_recv_fn fn;
    void *arg;
};

static struct udp_bind binds[UDP_MAX_BINDS];

int udp_bind(uint16_t port, udp_recv_fn fn, void *arg)
{
    if (!port || !fn)
        return -1;
    for (int i = 0; i < UDP_MAX_BINDS; i++)
        if (binds[i].fn && binds[i].port == port)
            return -1;
    for (int i = 0; i < UDP_MAX_BINDS; i++)
        if (!binds[i].fn) {
            binds[i] = (struct udp_bind){ port, fn, arg };
            return 0;
        }
    return -1;
}

void udp_input(uint32_t src, uint32_t dst, const uint8_t *p, size_t len)
{
    if (len < 8)
        return;
    size_t ulen = get16(p + 4);
    if (ulen < 8 || ulen > len)
        return;
    if (get16(p + 6) != 0 &&
        csum_fold(csum_add(csum_pseudo(src, dst, IPPROTO_UDP, ulen), p, ulen)) != 0)
        return;
    uint16_t sport = get16(p), dport = get16(p + 2);
    for (int i = 0; i < UDP_MAX_BINDS; i++)
        if (binds[i].fn && binds[i].port == dport) {
            binds[i].fn(src, sport, dport, p + 8, ulen - 8, binds[i].arg);
            return;
        }
}

int udp_sendto(uint16_t src_port, uint32_t dst_ip, uint16_t dst_port, const void *data, size_t len)
{
    if (len > L4_MAX - 8)
        return -1;
    uint8_t *u = L4_TX;
    put16(u, src_port);
    put16(u + 2, dst_port);
    put16(u + 4, (uint16_t)(len + 8));
    put16(u + 6, 0);
    memcpy(u + 8, data, len);
    uint16_t c = csum_fold(csum_add(csum_pseudo(net_cfg.ip, dst_ip, IPPROTO_UDP, len + 8), u, len + 8));
    put16(u + 6, c ? c : 0xffff);
    return ipv4_output(dst_ip, IPPROTO_UDP, len + 8);
}
