/*
 * memdirty: dirties a working set at a chosen rate, for migration and COLO tests.
 * Command line: "mib=N rate=R" (R in MiB/s, 0 = as fast as possible).
 *
 * Every pass increments the first byte of each page, in page order, so at any
 * instant the counters form at most one step: pages [0,k) hold c+1 and [k,n)
 * hold c (mod 256).  An observer can check that property on a copy of guest
 * RAM; the guest itself checks at each pass start that all pages hold c, and
 * halts with status 1 if not (a lost or stale page after a migration).
 */
#include "platform.h"
#include "console.h"

#define PAGE 4096u
#define PAGES_PER_MIB 256u
#define PRINT_INTERVAL_NS 250000000ull

static uint64_t cmdline_value(const char *key, uint64_t fallback)
{
    size_t key_len = strlen(key);
    const char *p = plat_cmdline();
    while (*p) {
        while (*p == ' ')
            p++;
        if (memcmp(p, key, key_len) == 0 && p[key_len] == '=') {
            uint64_t v = 0;
            for (p += key_len + 1; *p >= '0' && *p <= '9'; p++)
                v = v * 10 + (uint64_t)(*p - '0');
            return v;
        }
        while (*p && *p != ' ')
            p++;
    }
    return fallback;
}

int guest_main(void)
{
    uint64_t mib = cmdline_value("mib", 16);
    uint64_t rate = cmdline_value("rate", 0);
    uint64_t pages = mib * PAGES_PER_MIB;

    uint8_t *raw = malloc(mib * PAGES_PER_MIB * PAGE + PAGE);
    if (!raw || pages == 0) {
        console_printf("memdirty: cannot allocate %llu MiB\n", (unsigned long long)mib);
        return 2;
    }
    volatile uint8_t *base = (uint8_t *)(((uintptr_t)raw + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
    for (uint64_t i = 0; i < pages; i++)
        base[i * PAGE] = 0;
    console_printf("memdirty: base=%p pages=%llu rate=%llu\n", (void *)base,
                   (unsigned long long)pages, (unsigned long long)rate);

    uint8_t counter = 0;                 /* what every page holds at pass start */
    uint64_t written_mib = 0;            /* for the rate limit */
    uint64_t start_ns = plat_now_ns();
    uint64_t last_print_ns = 0;
    for (uint64_t pass = 1;; pass++) {
        for (uint64_t i = 0; i < pages; i++) {
            if (base[i * PAGE] != counter) {
                console_printf("memdirty: invariant broken in pass %llu: page %llu holds %u, expected %u\n",
                               (unsigned long long)pass, (unsigned long long)i,
                               base[i * PAGE], counter);
                return 1;
            }
        }
        for (uint64_t i = 0; i < pages; i++) {
            base[i * PAGE]++;
            if (rate && (i + 1) % PAGES_PER_MIB == 0) {
                written_mib++;
                uint64_t due_ns = start_ns + written_mib * 1000000000ull / rate;
                while (plat_now_ns() < due_ns)
                    plat_poll(due_ns);
            }
        }
        counter++;
        uint64_t now = plat_now_ns();
        if (pass == 1 || now - last_print_ns >= PRINT_INTERVAL_NS) {
            console_printf("pass %llu\n", (unsigned long long)pass);
            last_print_ns = now;
        }
    }
}
