/* Stack setup and the per-iteration driver. */
#include "netif.h"

struct net_config net_cfg;
uint64_t net_now;

static uint8_t rxbuf[ETH_FRAME_MAX + 4];

int net_init(void)
{
    const char *cmd = plat_cmdline();
    char val[40];
    net_now = plat_now_ns();
    plat_net_mac(net_cfg.mac);

    if (cmdline_get(cmd, "ip", val, sizeof val) < 0)
        return -1;
    const char *end = parse_ipv4(val, &net_cfg.ip);
    if (!end)
        return -1;
    unsigned prefix = 24;
    if (*end == '/') {
        prefix = 0;
        for (end++; *end >= '0' && *end <= '9'; end++)
            prefix = prefix * 10 + (unsigned)(*end - '0');
        if (prefix > 32)
            return -1;
    }
    if (*end)
        return -1;
    net_cfg.mask = prefix ? 0xffffffffu << (32 - prefix) : 0;
    net_cfg.gw = 0;
    if (cmdline_get(cmd, "gw", val, sizeof val) >= 0) {
        end = parse_ipv4(val, &net_cfg.gw);
        if (!end || *end)
            return -1;
    }
    const uint8_t *m = net_cfg.mac;
    net_log("net: ip %I/%u gw %I mac %02x:%02x:%02x:%02x:%02x:%02x", net_cfg.ip, prefix, net_cfg.gw,
            m[0], m[1], m[2], m[3], m[4], m[5]);
    return 0;
}

uint32_t net_ip(void)
{
    return net_cfg.ip;
}

uint64_t net_clock(void)
{
    return net_now;
}

void net_poll(void)
{
    net_now = plat_now_ns();
    /* Timers first: everything due at this clock value fires before any
     * frame is looked at, whichever frames arrived in this iteration. */
    arp_timers(net_now);
    tcp_timers(net_now);
    tcp_dispatch_events();
    /* Then each frame is taken to completion (callbacks, replies, ACKs)
     * before the next is read, so what we send depends on the frames and the
     * clock but not on how the NIC happened to batch them: a COLO primary and
     * secondary that see the same frames emit the same packets.  The batch
     * is bounded so timers still run under a flood. */
    for (int i = 0; i < 256; i++) {
        size_t n = plat_net_read(rxbuf, sizeof rxbuf);
        if (n == 0)
            break;
        if (n <= sizeof rxbuf)
            eth_input(rxbuf, n);
        tcp_dispatch_events();
    }
}

uint64_t net_next_deadline(void)
{
    uint64_t a = arp_next_deadline(), t = tcp_next_deadline();
    return a < t ? a : t;
}
