/* platform.h on hypercalls (docs/guest-abi.md). */
#include "platform.h"
#include "abi.h"
#include "runtime.h"

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

/* Monotonic time from the TSC, without an exit: one time hypercall per generation of
 * the clock page (after every stop of the VM) gives the base, the TSC the rest.  The
 * result is clamped to the last value returned, so TSC and host clock drift never
 * make it go back across a new base. */
uint64_t plat_now_ns(void)
{
    static uint64_t last, generation, base_ns, base_tsc;
    const volatile struct abi_clock *clock = (const volatile struct abi_clock *)(uintptr_t)ABI_CLOCK_GPA;
    uint64_t mult = clock->mult, now;
    if (mult && clock->generation == generation && generation) {
        now = base_ns + (uint64_t)((unsigned __int128)(rdtsc() - base_tsc) * mult >> 32);
    } else {
        struct hc_time t;
        generation = clock->generation;
        hypercall(HC_TIME, &t);
        base_tsc = rdtsc();
        now = base_ns = t.monotonic_ns;
    }
    if (now < last)
        now = last;
    return last = now;
}

uint64_t plat_wall_ns(void)
{
    struct hc_time t;
    hypercall(HC_TIME, &t);
    return t.wall_ns;
}

#define barrier() __asm__ volatile("" ::: "memory")
#define fence()   __asm__ volatile("mfence" ::: "memory")

/* The console ring (docs/guest-abi.md): bytes go into guest RAM, and a doorbell the
 * VMM absorbs with an ioeventfd (no exit) tells its console thread when a line ended or
 * the ring is half full.  The VMM also drains the ring whenever the vCPU stops, so
 * output before a halt, a fault or a pause is never lost. */
#define CONSOLE_RING 16384

static struct console_ctrl console_ctrl_block __attribute__((aligned(64)));
static uint32_t console_rung;           /* prod when the doorbell last rang */
static char console_data[CONSOLE_RING] __attribute__((aligned(64)));
struct console_ctrl *console_ctrl;

void console_doorbell(void)
{
    __asm__ volatile("outl %%eax, %0" : : "Nd"((uint16_t)HC_CONSOLE_DOORBELL), "a"(0) : "memory");
}

/* Ring the doorbell if bytes went in since it last rang: a partial line comes out
 * before the guest goes idle (plat_poll), not only at the next newline. */
static void console_flush(void)
{
    if (console_ctrl && console_ctrl->prod != console_rung) {
        console_rung = console_ctrl->prod;
        console_doorbell();
    }
}

void console_ring_init(void)
{
    struct hc_console_setup arg = { (uint64_t)(uintptr_t)&console_ctrl_block,
                                    (uint64_t)(uintptr_t)console_data, CONSOLE_RING, -1 };
    hypercall(HC_CONSOLE_SETUP, &arg);
    if (arg.ret == 0)
        console_ctrl = &console_ctrl_block;
}

void plat_console_write(const char *s, size_t n)
{
    if (!console_ctrl) {
        struct hc_console_write arg = { (uint64_t)(uintptr_t)s, n };
        hypercall(HC_CONSOLE_WRITE, &arg);
        return;
    }
    bool line_ended = false;
    while (n) {
        uint32_t prod = console_ctrl->prod;
        uint32_t room = CONSOLE_RING - (prod - console_ctrl->cons);
        if (!room) {            /* full: the host is behind; it drains on the doorbell */
            console_rung = prod;
            console_doorbell();
            while (console_ctrl->prod - console_ctrl->cons >= CONSOLE_RING)
                __asm__ volatile("pause" ::: "memory");
            continue;
        }
        uint32_t at = prod % CONSOLE_RING;
        size_t chunk = n < room ? n : room;
        if (chunk > CONSOLE_RING - at)
            chunk = CONSOLE_RING - at;
        memcpy(console_data + at, s, chunk);
        for (size_t i = 0; i < chunk; i++)
            line_ended |= s[i] == '\n';
        barrier();
        console_ctrl->prod = prod + (uint32_t)chunk;
        s += chunk;
        n -= chunk;
    }
    fence();
    if (line_ended || console_ctrl->prod - console_ctrl->cons >= CONSOLE_RING / 2)
        console_flush();
}

/* The NIC rings (docs/guest-abi.md).  Each descriptor owns one buffer for
 * good: a TX slot's buffer is refilled when the slot comes round again, an RX
 * buffer is posted back as soon as its frame is copied out. */
#define RING_SIZE 256
#define RING_BUF  2048

struct nic_ctrl *nic_ctrl;
struct nic_desc *nic_tx_ring, *nic_rx_ring;
static uint8_t *tx_bufs;

void doorbell(void)
{
    __asm__ volatile("outl %%eax, %0" : : "Nd"((uint16_t)HC_NET_DOORBELL), "a"(0) : "memory");
}

void net_rings_init(void)
{
    if (!boot_info->nic_present)
        return;
    size_t need = 4096 + sizeof(struct nic_ctrl) + 2 * RING_SIZE * sizeof(struct nic_desc) +
                  2 * RING_SIZE * RING_BUF;
    uint8_t *block = malloc(need);
    if (!block)
        return;
    memset(block, 0, need);
    uint8_t *p = (uint8_t *)(((uintptr_t)block + 4095) & ~(uintptr_t)4095);
    nic_ctrl = (struct nic_ctrl *)p;
    p += sizeof *nic_ctrl;
    nic_tx_ring = (struct nic_desc *)p;
    p += RING_SIZE * sizeof *nic_tx_ring;
    nic_rx_ring = (struct nic_desc *)p;
    p += RING_SIZE * sizeof *nic_rx_ring;
    tx_bufs = p;
    p += RING_SIZE * RING_BUF;
    for (uint32_t i = 0; i < RING_SIZE; i++) {
        nic_rx_ring[i].addr = (uint64_t)(uintptr_t)(p + i * RING_BUF);
        nic_rx_ring[i].len = RING_BUF;
    }
    nic_ctrl->rx_avail = RING_SIZE;
    struct hc_net_setup arg = { (uint64_t)(uintptr_t)nic_ctrl, (uint64_t)(uintptr_t)nic_tx_ring, RING_SIZE,
                                (uint64_t)(uintptr_t)nic_rx_ring, RING_SIZE, -1 };
    hypercall(HC_NET_SETUP, &arg);
    if (arg.ret != 0)
        nic_ctrl = 0;
}

static bool rx_pending(void)
{
    return nic_ctrl && nic_ctrl->rx_used != nic_ctrl->rx_cons;
}

/* No spinning on an empty ring: on a host with few CPUs the NIC thread that would fill it
 * needs the CPU a spinning vCPU holds (kvstore served 15-20% more requests per second without
 * the 50 us spin it had), and under load the ring is seldom empty, so exits stay rare. */
bool plat_poll(uint64_t deadline_ns)
{
    if (rx_pending())
        return true;
    if (plat_now_ns() >= deadline_ns)
        return false;
    console_flush();
    struct hc_poll arg = { deadline_ns, 0 };
    hypercall(HC_POLL, &arg);
    return arg.ready != 0;
}

size_t plat_net_read(void *frame, size_t cap)
{
    while (rx_pending()) {
        barrier();
        struct nic_desc *d = &nic_rx_ring[nic_ctrl->rx_cons % RING_SIZE];
        size_t len = d->len;
        bool fits = len <= cap;
        if (fits)
            memcpy(frame, (const void *)(uintptr_t)d->addr, len);
        d->len = RING_BUF;
        barrier();
        nic_ctrl->rx_cons++;
        nic_ctrl->rx_avail++;
        fence();
        if (nic_ctrl->rx_notify)
            doorbell();
        if (fits)
            return len;
    }
    return 0;
}

int plat_net_write(const void *frame, size_t len)
{
    if (!nic_ctrl || len > RING_BUF)
        return -1;
    while (nic_ctrl->tx_prod - nic_ctrl->tx_cons >= RING_SIZE) {   /* full: the host is behind */
        doorbell();
        struct hc_net_wait_tx arg = { 0 };
        hypercall(HC_NET_WAIT_TX, &arg);
    }
    uint32_t slot = nic_ctrl->tx_prod % RING_SIZE;
    uint8_t *buf = tx_bufs + (size_t)slot * RING_BUF;
    memcpy(buf, frame, len);
    nic_tx_ring[slot].addr = (uint64_t)(uintptr_t)buf;
    nic_tx_ring[slot].len = (uint32_t)len;
    barrier();
    nic_ctrl->tx_prod++;
    fence();
    if (nic_ctrl->tx_notify)
        doorbell();
    return 0;
}

void plat_net_mac(uint8_t mac[6])
{
    memcpy(mac, boot_info->mac, 6);
}

uint64_t plat_block_sectors(void)
{
    return boot_info->disk_sectors;
}

int plat_block_read(uint64_t sector, void *buf, size_t count)
{
    struct hc_block arg = { sector, (uint64_t)(uintptr_t)buf, count, -1 };
    hypercall(HC_BLOCK_READ, &arg);
    return (int)arg.ret;
}

int plat_block_write(uint64_t sector, const void *buf, size_t count)
{
    struct hc_block arg = { sector, (uint64_t)(uintptr_t)buf, count, -1 };
    hypercall(HC_BLOCK_WRITE, &arg);
    return (int)arg.ret;
}

const char *plat_cmdline(void)
{
    return boot_info->cmdline;
}

void plat_halt(int status)
{
    struct hc_halt arg = { (uint64_t)(uint32_t)status };
    for (;;)
        hypercall(HC_HALT, &arg);
}
