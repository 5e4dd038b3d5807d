/* ICMP: echo replies only. */
#include "netif.h"

void icmp_input(uint32_t src, const uint8_t *p, size_t len)
{
    if (len < 8 || p[0] != 8 || p[1] != 0)
        return;
    if (csum_fold(csum_add(0, p, len)) != 0)
        return;
    if (len > L4_MAX)
        return;
    uint8_t *r = L4_TX;
    memmove(r, p, len);
    r[0] = 0; /* echo reply; identifier, sequence and data are echoed */
    put16(r + 2, 0);
    put16(r + 2, csum_fold(csum_add(0, r, len)));
    ipv4_output(src, IPPROTO_ICMP, len);
}
