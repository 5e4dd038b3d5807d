/* ARP: answer requests for our address, resolve next hops through a small
 * cache, and hold IPv4 frames while a resolution is outstanding. */
#include "netif.h"

#define ARP_CACHE      16
#define ARP_PENDING    32          /* frames held while resolving, in total */
#define ARP_RETRY_NS   1000000000ull
#define ARP_TRIES      3
#define ARP_TTL_NS     (300ull * 1000000000ull)

struct arp_entry {
    uint32_t ip;
    uint8_t mac[6];
    bool resolved;
    uint8_t tries;
    uint64_t stamp;       /* resolved: when learnt; resolving: next retry */
};

struct pending {
    uint32_t next_hop;
    size_t len;
    uint8_t *frame;       /* malloc'd copy, NULL when the slot is free */
};

static struct arp_entry cache[ARP_CACHE];
static struct pending pend[ARP_PENDING];

static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

static void arp_send(uint16_t op, const uint8_t tha[6], uint32_t tpa, const uint8_t dst[6])
{
    uint8_t *p = net_txbuf + ETH_HLEN;
    put16(p, 1);                 /* Ethernet */
    put16(p + 2, ETHERTYPE_IPV4);
    p[4] = 6;
    p[5] = 4;
    put16(p + 6, op);
    memcpy(p + 8, net_cfg.mac, 6);
    put32(p + 14, net_cfg.ip);
    memcpy(p + 18, tha, 6);
    put32(p + 24, tpa);
    eth_output(net_txbuf, dst, ETHERTYPE_ARP, ETH_HLEN + 28);
}

static struct arp_entry *lookup(uint32_t ip)
{
    for (int i = 0; i < ARP_CACHE; i++)
        if (cache[i].ip == ip && (cache[i].resolved || cache[i].tries))
            return &cache[i];
    return NULL;
}

/* A free slot, else the oldest resolved entry (never one still resolving
 * unless all are, so queued frames keep their entry). */
static struct arp_entry *victim(void)
{
    struct arp_entry *best = NULL;
    for (int i = 0; i < ARP_CACHE; i++) {
        struct arp_entry *e = &cache[i];
        if (!e->resolved && !e->tries)
            return e;
        if (!best || (e->resolved && (!best->resolved || e->stamp < best->stamp)))
            best = e;
    }
    return best;
}

static void drop_pending(uint32_t ip)
{
    for (int i = 0; i < ARP_PENDING; i++)
        if (pend[i].frame && pend[i].next_hop == ip) {
            free(pend[i].frame);
            pend[i].frame = NULL;
        }
}

static void learn(uint32_t ip, const uint8_t mac[6], bool create)
{
    struct arp_entry *e = lookup(ip);
    if (!e) {
        if (!create)
            return;
        e = victim();
        if (e->tries)
            drop_pending(e->ip);
    }
    e->ip = ip;
    memcpy(e->mac, mac, 6);
    e->resolved = true;
    e->tries = 0;
    e->stamp = net_now;
    /* Release frames that waited for this address, oldest first. */
    for (int i = 0; i < ARP_PENDING; i++)
        if (pend[i].frame && pend[i].next_hop == ip) {
            uint8_t *f = pend[i].frame;
            pend[i].frame = NULL;
            eth_output(f, mac, ETHERTYPE_IPV4, pend[i].len);
            free(f);
        }
}

void arp_input(const uint8_t *p, size_t len)
{
    if (len < 28 || get16(p) != 1 || get16(p + 2) != ETHERTYPE_IPV4 || p[4] != 6 || p[5] != 4)
        return;
    uint16_t op = get16(p + 6);
    const uint8_t *sha = p + 8;
    uint32_t spa = get32(p + 14), tpa = get32(p + 24);
    if (spa == 0 || (sha[0] & 1))
        return;
    bool for_us = tpa == net_cfg.ip;
    /* RFC 826: refresh a known sender; add it only when the packet is for us. */
    learn(spa, sha, for_us);
    if (for_us && op == 1)
        arp_send(2, sha, spa, sha);
}

int arp_output_ip(uint8_t *frame, size_t len, uint32_t next_hop)
{
    if (next_hop == 0xffffffffu || next_hop == (net_cfg.ip | ~net_cfg.mask)) {
        eth_output(frame, bcast, ETHERTYPE_IPV4, len);
        return 0;
    }
    uint64_t now = net_now;
    struct arp_entry *e = lookup(next_hop);
    if (e && e->resolved && now - e->stamp < ARP_TTL_NS) {
        eth_output(frame, e->mac, ETHERTYPE_IPV4, len);
        return 0;
    }
    int slot = -1;
    for (int i = 0; i < ARP_PENDING && slot < 0; i++)
        if (!pend[i].frame)
            slot = i;
    if (slot >= 0) {
        /* eth_output pads short frames in place up to 60 bytes. */
        pend[slot].frame = malloc(len < 60 ? 60 : len);
        if (pend[slot].frame) {
            memcpy(pend[slot].frame, frame, len);
            pend[slot].len = len;
            pend[slot].next_hop = next_hop;
        } else {
            slot = -1;
        }
    }
    if (!e || e->resolved) {
        /* Unknown or expired: (re)start resolution now. */
        if (!e) {
            e = victim();
            if (e->tries)
                drop_pending(e->ip);
        }
        e->ip = next_hop;
        e->resolved = false;
        e->tries = 1;
        e->stamp = now + ARP_RETRY_NS;
        arp_send(1, (const uint8_t[6]){ 0 }, next_hop, bcast);
    }
    return slot >= 0 ? 0 : -1;
}

uint64_t arp_next_deadline(void)
{
    uint64_t d = UINT64_MAX;
    for (int i = 0; i < ARP_CACHE; i++)
        if (!cache[i].resolved && cache[i].tries && cache[i].stamp < d)
            d = cache[i].stamp;
    return d;
}

void arp_timers(uint64_t now)
{
    for (int i = 0; i < ARP_CACHE; i++) {
        struct arp_entry *e = &cache[i];
        if (e->resolved || !e->tries || now < e->stamp)
            continue;
        if (e->tries >= ARP_TRIES) {
            /* Give up; the frames' senders (TCP) retransmit later. */
            drop_pending(e->ip);
            e->tries = 0;
            continue;
        }
        e->tries++;
        e->stamp = now + ARP_RETRY_NS;
        arp_send(1, (const uint8_t[6]){ 0 }, e->ip, bcast);
    }
}
