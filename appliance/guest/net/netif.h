/* Internal interfaces between the stack's layers (not for the application). */
#ifndef NETIF_H
#define NETIF_H

#include "platform.h"
#include "net.h"

#define ETH_HLEN     14
#define ETH_MTU      1500
#define ETH_FRAME_MAX (ETH_HLEN + ETH_MTU)
#define ETHERTYPE_IPV4 0x0800
#define ETHERTYPE_ARP  0x0806

#define IP_HLEN      20
#define IPPROTO_ICMP 1
#define IPPROTO_TCP  6
#define IPPROTO_UDP  17

struct net_config {
    uint8_t mac[6];
    uint32_t ip, mask, gw;
};
extern struct net_config net_cfg;

/* The clock, read once per net_poll(): every decision in one iteration sees
 * the same time, and a replay needs only one clock value per iteration. */
extern uint64_t net_now;

/* Byte-order access to unaligned wire fields. */
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Internet checksum: sum is a running 32-bit accumulator. */
uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len);
uint16_t csum_fold(uint32_t sum);
/* The TCP/UDP pseudo-header part of the sum. */
uint32_t csum_pseudo(uint32_t src, uint32_t dst, uint8_t proto, size_t len);

/* eth.c: the one transmit buffer.  Upper layers write their headers and
 * payload in place, then hand the frame down. */
extern uint8_t net_txbuf[ETH_FRAME_MAX];
void eth_input(const uint8_t *frame, size_t len);
/* Fills the Ethernet header of a frame already built and transmits it. */
void eth_output(uint8_t *frame, const uint8_t dst_mac[6], uint16_t type, size_t len);

/* arp.c */
void arp_input(const uint8_t *pkt, size_t len);
/* Sends an IPv4 frame to the next hop, queueing it while ARP resolves.
 * Returns 0 when sent or queued. */
int arp_output_ip(uint8_t *frame, size_t len, uint32_t next_hop);
uint64_t arp_next_deadline(void);
void arp_timers(uint64_t now);

/* ipv4.c: the L4 payload of net_txbuf starts at net_txbuf + ETH_HLEN + IP_HLEN. */
#define L4_TX (net_txbuf + ETH_HLEN + IP_HLEN)
#define L4_MAX (ETH_MTU - IP_HLEN)
void ipv4_input(const uint8_t *pkt, size_t len);
int ipv4_output(uint32_t dst, uint8_t proto, size_t l4len);

/* Upper layers get the datagram payload and addresses. */
void icmp_input(uint32_t src, const uint8_t *p, size_t len);
void udp_input(uint32_t src, uint32_t dst, const uint8_t *p, size_t len);
void tcp_input(uint32_t src, uint32_t dst, const uint8_t *p, size_t len);

/* tcp.c */
uint64_t tcp_next_deadline(void);
void tcp_timers(uint64_t now);
void tcp_dispatch_events(void);

#endif
