/*
 * probe: a test guest that exercises one runtime feature or one way to fail,
 * chosen by "mode=<name>" on the command line.  Used by tests/test_vmm_*.py.
 *   exit=N   return N                  null     write to address 0 (#PF)
 *   priv     execute hlt at CPL3 (#GP)  loop     spin forever without exits
 *   badptr   console write from outside RAM     badport  hypercall on an unknown port
 *   sse      floating point through xmm registers
 *   disk     write, read back and compare sectors, then keep reading them
 *   echo     send every received frame back with the MACs swapped
 *   hcbench  time 100000 time hypercalls (the VMM's exit-handling rate)
 *   clock    print the clock page's time and the time hypercall's, side by side
 */
#include "platform.h"
#include "console.h"
#include "abi.h"

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
        plat_console_write((const char *)0x7f0000000000ull, 16);
        return 0;
    }
    if (is(mode, "badport")) {
        struct hc_halt arg0 = { 0 };
        hypercall(0x5f0, &arg0);
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
        for (int i = 0; i < 3; i++) {
            struct hc_time t;
            uint64_t page = plat_now_ns();
            hypercall(HC_TIME, &t);
            console_printf("clock page=%llu hypercall=%llu\n", (unsigned long long)page,
                           (unsigned long long)t.monotonic_ns);
            plat_poll(plat_now_ns() + 20000000);
        }
        return 0;
    }
    if (is(mode, "disk"))
        disk();
    if (is(mode, "echo"))
        echo();
    console_printf("probe: unknown mode '%s'\n", mode);
    return 100;
}
