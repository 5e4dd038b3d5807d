/* Ethernet II framing. */
#include "netif.h"

uint8_t net_txbuf[ETH_FRAME_MAX];

static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

void eth_input(const uint8_t *frame, size_t len)
{
    if (len < ETH_HLEN)
        return;
    /* Only frames for us or broadcast; the tap/bridge may flood others. */
    if (memcmp(frame, net_cfg.mac, 6) != 0 && memcmp(frame, bcast, 6) != 0)
        return;
    uint16_t type = get16(frame + 12);
    const uint8_t *payload = frame + ETH_HLEN;
    size_t plen = len - ETH_HLEN;
    if (type == ETHERTYPE_ARP)
        arp_input(payload, plen);
    else if (type == ETHERTYPE_IPV4)
        ipv4_input(payload, plen);
}

void eth_output(uint8_t *frame, const uint8_t dst_mac[6], uint16_t type, size_t len)
{
    memcpy(frame, dst_mac, 6);
    memcpy(frame + 6, net_cfg.mac, 6);
    put16(frame + 12, type);
    /* Pad to the 60-byte minimum so the output is the same on every NIC. */
    if (len < 60) {
        memset(frame + len, 0, 60 - len);
        len = 60;
    }
    plat_net_write(frame, len);
}
