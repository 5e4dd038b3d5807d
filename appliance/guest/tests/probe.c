/*
 * probe: a test guest that exercises one runtime feature or one way to fail,
 * chosen by "mode=<name>" on the command line.  Used by tests/test_vmm_*.py.
 *   exit=N   return N                  null     write to address 0 (#PF)
 *   priv     execute hlt at CPL3 (#GP)  loop     spin forever without exits
 *   badptr   console write hypercall from outside RAM   badport  hypercall on an unknown port
 *   v1net    the guest ABI v1 net write hypercall (refused)
 *   sse      floating point through xmm registers
 *   disk     write, read back and compare sectors, then keep reading them
 *   echo     send every received frame back with the MACs swapped
 *   hcbench  time 100000 time hypercalls (the VMM's exit-handling rate)
 *   badring=KIND  break the NIC rings as KIND says (txaddr txlen txoverrun rxoverrun rxaddr), then spin
 *   flood    n=N: send N numbered frames back to back (the TX ring fills), then read
 *            N numbered frames slowly (the RX ring fills) and report whether any was
 *            lost, duplicated or reordered
 *   slowecho echo every frame back, spending delay_us before each one
 *   burst    n=N: print N numbered lines of 100 bytes (the console ring wraps many times), then exit
 *   stream   print numbered lines forever, spending delay_us before each one
 *   badconsole=KIND  break the console ring as KIND says (overrun: the producer index far
 *            ahead; outside: set up a ring outside RAM), then spin
 *   clock    n=N: print plat_now_ns and the time hypercall side by side, N times 20 ms apart
 */
#include "platform.h"
#include "console.h"
#include "abi.h"
#include "runtime.h"

static const char *arg(const char *key)
{
    size_t key_len = strlen(key);
    for (const char *p = plat_cmdline(); *p; p++) {
        if ((p == plat_cmdline() || p[-1] == ' ') && memcmp(p, key, key_len) == 0 && p[key_len] == '=')
            return p + key_len + 1;
    }
    return "";
}

static bool is(const char *value, const char *word)
{
    size_t n = strlen(word);
    return memcmp(value, word, n) == 0 && (value[n] == 0 || value[n] == ' ');
}

__attribute__((noreturn)) static void disk(void)
{
    static uint8_t out[4096], in[4096];
    uint64_t sectors = plat_block_sectors();
    if (sectors < 8) {
        console_printf("disk: only %llu sectors\n", (unsigned long long)sectors);
        plat_halt(1);
    }
    for (unsigned i = 0; i < sizeof out; i++)
        out[i] = (uint8_t)(i * 7 + 3);
    if (plat_block_write(0, out, 8) != 0 || plat_block_read(0, in, 8) != 0 ||
        memcmp(in, out, sizeof out) != 0) {
        console_printf("disk: round trip failed\n");
        plat_halt(1);
    }
    if (plat_block_read(sectors, in, 1) != -1) {
        console_printf("disk: read past the end succeeded\n");
        plat_halt(1);
    }
    console_printf("disk ok sectors=%llu\n", (unsigned long long)sectors);
    /* Keep the VMM writing guest RAM, into a buffer spread over many pages. */
    uint8_t *spread = malloc(64 * 4096);
    for (uint64_t round = 0;; round++) {
        plat_block_read(round % 8, spread + (round % 64) * 4096, 1);
        plat_poll(plat_now_ns() + 1000000);
    }
}

__attribute__((noreturn)) static void echo(void)
{
    static uint8_t frame[2048];
    console_printf("echo ready\n");
    for (;;) {
        plat_poll(plat_now_ns() + 1000000000ull);
        size_t n;
        while ((n = plat_net_read(frame, sizeof frame)) > 0) {
            uint8_t mac[6];
            memcpy(mac, frame, 6);
            memcpy(frame, frame + 6, 6);
            memcpy(frame + 6, mac, 6);
            plat_net_write(frame, n);
        }
    }
}

static unsigned long number(const char *key)
{
    unsigned long n = 0;
    for (const char *p = arg(key); *p >= '0' && *p <= '9'; p++)
        n = n * 10 + (unsigned long)(*p - '0');
    return n;
}

static void spin_us(unsigned long us)
{
    uint64_t until = plat_now_ns() + us * 1000;
    while (plat_now_ns() < until)
        __asm__ volatile("pause");
}

/* Frames of the flood test: broadcast, ethertype 0x88b5, a u32 sequence number. */
__attribute__((noreturn)) static void flood(void)
{
    static uint8_t frame[64];
    unsigned long n = number("n");
    memset(frame, 0xff, 6);
    plat_net_mac(frame + 6);
    frame[12] = 0x88, frame[13] = 0xb5;
    for (uint32_t i = 0; i < n; i++) {
        memcpy(frame + 14, &i, 4);
        if (plat_net_write(frame, sizeof frame) != 0) {
            console_printf("flood: send %u failed\n", i);
            plat_halt(1);
        }
    }
    console_printf("flood: sent %lu\n", n);
    uint32_t expect = 0;
    unsigned long bad = 0;
    uint8_t in[2048];
    while (expect < n) {
        plat_poll(plat_now_ns() + 1000000000ull);
        size_t len;
        while ((len = plat_net_read(in, sizeof in)) > 0) {
            uint32_t seq;
            memcpy(&seq, in + 14, 4);
            if (len < 18 || seq != expect)
                bad++;
            expect = seq + 1;
            spin_us(20);
        }
    }
    console_printf("flood: received %u bad %lu\n", expect, bad);
    plat_halt(bad ? 1 : 0);
}

__attribute__((noreturn)) static void slowecho(void)
{
    static uint8_t frame[2048];
    unsigned long delay = number("delay_us");
    console_printf("echo ready\n");
    for (;;) {
        plat_poll(plat_now_ns() + 1000000000ull);
        size_t n;
        while ((n = plat_net_read(frame, sizeof frame)) > 0) {
            spin_us(delay);
            uint8_t mac[6];
            memcpy(mac, frame, 6);
            memcpy(frame, frame + 6, 6);
            memcpy(frame + 6, mac, 6);
            plat_net_write(frame, n);
        }
    }
}

__attribute__((noreturn)) static void badring(const char *kind)
{
    console_printf("badring %s\n", kind);  /* first: the VM may stop as soon as the ring is broken */
    uint32_t slot = nic_ctrl->tx_prod % 256;
    if (is(kind, "txaddr")) {
        nic_tx_ring[slot].addr = 0x7f0000000000ull;
        nic_tx_ring[slot].len = 60;
        nic_ctrl->tx_prod++;
    } else if (is(kind, "txlen")) {
        nic_tx_ring[slot].len = 1u << 30;
        nic_ctrl->tx_prod++;
    } else if (is(kind, "txoverrun")) {
        nic_ctrl->tx_prod += 1000;
    } else if (is(kind, "rxoverrun")) {
        nic_ctrl->rx_avail += 1000;
    } else if (is(kind, "rxaddr")) {
        for (int i = 0; i < 256; i++)
            nic_rx_ring[i].addr = 0xfffffffffffff000ull;
    }
    doorbell();
    for (;;)
        __asm__ volatile("" ::: "memory");
}

static void burst(unsigned long n)
{
    for (unsigned long i = 0; i < n; i++)
        console_printf("burst %lu ........................................................................................\n", i);
}

__attribute__((noreturn)) static void stream(unsigned long delay)
{
    for (unsigned long i = 0;; i++) {
        spin_us(delay);
        console_printf("stream %lu\n", i);
    }
}

__attribute__((noreturn)) static void badconsole(const char *kind)
{
    console_printf("badconsole %s\n", kind);
    if (is(kind, "overrun")) {
        console_ctrl->prod += 100000;
        console_doorbell();
    } else if (is(kind, "outside")) {
        struct hc_console_setup arg = { 0x100000, 0x7f0000000000ull, 4096, -1 };
        hypercall(HC_CONSOLE_SETUP, &arg);
    }
    for (;;)
        __asm__ volatile("" ::: "memory");
}

int guest_main(void)
{
    const char *mode = arg("mode");
    if (is(mode, "exit")) {
        int status = 0;
        for (const char *p = arg("status"); *p >= '0' && *p <= '9'; p++)
            status = status * 10 + (*p - '0');
        console_printf("exiting with %d\n", status);
        return status;
    }
    if (is(mode, "null")) {
        *(volatile int *)0 = 1;
        return 0;
    }
    if (is(mode, "priv")) {
        __asm__ volatile("hlt");
        return 0;
    }
    if (is(mode, "loop")) {
        console_printf("looping\n");
        for (;;)
            __asm__ volatile("" ::: "memory");
    }
    if (is(mode, "badptr")) {
        struct hc_console_write bad = { 0x7f0000000000ull, 16 };
        hypercall(HC_CONSOLE_WRITE, &bad);
        return 0;
    }
    if (is(mode, "badport")) {
        struct hc_halt arg0 = { 0 };
        hypercall(0x5f0, &arg0);
        return 0;
    }
    if (is(mode, "v1net")) {
        uint64_t v1_write[3] = { 0x100000, 60, 0 };
        hypercall(0x503, v1_write);
        return 0;
    }
    if (is(mode, "sse")) {
        volatile double x = 1.5;
        double sum = 0;
        for (int i = 0; i < 1000; i++)
            sum += x * i;
        console_printf("sse %d\n", (int)sum);
        return 0;
    }
    if (is(mode, "hcbench")) {
        enum { CALLS = 100000 };
        uint64_t start = plat_now_ns();
        struct hc_time t;
        for (int i = 0; i < CALLS; i++)
            hypercall(HC_TIME, &t);
        uint64_t elapsed = plat_now_ns() - start;
        console_printf("hcbench: %d calls in %llu us, %llu calls/s\n", CALLS,
                       (unsigned long long)(elapsed / 1000),
                       (unsigned long long)(CALLS * 1000000000ull / elapsed));
        return 0;
    }
    if (is(mode, "clock")) {
        unsigned long rounds = number("n") ? number("n") : 3;
        for (unsigned long i = 0; i < rounds; i++) {
            struct hc_time t;
            uint64_t page = plat_now_ns();
            hypercall(HC_TIME, &t);
            console_printf("clock page=%llu hypercall=%llu\n", (unsigned long long)page,
                           (unsigned long long)t.monotonic_ns);
            spin_us(20000);
        }
        return 0;
    }
    if (is(mode, "disk"))
        disk();
    if (is(mode, "flood"))
        flood();
    if (is(mode, "slowecho"))
        slowecho();
    if (is(mode, "burst")) {
        burst(number("n"));
        return 0;
    }
    if (is(mode, "stream"))
        stream(number("delay_us"));
    if (*arg("badconsole"))
        badconsole(arg("badconsole"));
    if (*arg("badring"))
        badring(arg("badring"));
    if (is(mode, "echo"))
        echo();
    console_printf("probe: unknown mode '%s'\n", mode);
    return 100;
}
