/*
 * The C comparer driven from C alone, as the datapath loop (native/colo_path.c) drives it:
 * no Python runtime is started, so nothing here can lean on Python objects or the GIL.
 * test_netfilter_compare.py feeds it events on stdin and compares what it prints with
 * PyComparer's doings.
 *
 *   stdin   records: op(1) value(8, a little-endian double) length(4, little-endian) frame(length)
 *           op 'n' new comparer (value: compare_timeout_ms, length: max_queue_size, no frame),
 *           'p' primary, 's' secondary (value: now), 'e' scan_expired (value: now),
 *           'c' checkpoint, 'f' failover
 *   stdout  "R <hex>" a released frame, "C <reason>" a checkpoint request, "E <0|1>" a scan's
 *           result; after every record but 'n', "S <held> <failed_over> <counters...>"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "colo.h"

static void release(void *ctx, const uint8_t *frame, size_t len)
{
    printf("R ");
    for (size_t i = 0; i < len; i++)
        printf("%02x", frame[i]);
    printf("\n");
}

static void request_checkpoint(void *ctx, const char *reason)
{
    printf("C %s\n", reason);
}

int main(void)
{
    comparer *c = NULL;
    static uint8_t frame[1 << 16];
    unsigned char op;
    double value;
    uint32_t length;
    while (fread(&op, 1, 1, stdin) == 1) {
        if (fread(&value, 8, 1, stdin) != 1 || fread(&length, 4, 1, stdin) != 1)
            return 2;
        if (op != 'n' && (length > sizeof frame || fread(frame, 1, length, stdin) != length))
            return 2;
        if (op == 'n') {
            cmp_free(c);
            c = cmp_new((unsigned)value, length, NULL, 0, release, request_checkpoint, NULL);
            if (!c)
                return 3;
            continue;
        }
        if (!c)
            return 2;
        switch (op) {
        case 'p': cmp_primary(c, frame, length, value); break;
        case 's': cmp_secondary(c, frame, length, value); break;
        case 'e': printf("E %d\n", cmp_scan_expired(c, value)); break;
        case 'c': cmp_checkpoint(c); break;
        case 'f': cmp_failover(c); break;
        default: return 2;
        }
        printf("S %zu %d", cmp_held(c), cmp_failed_over(c));
        const uint64_t (*counters)[CMP_COUNTERS] = cmp_counters(c);
        for (int flow = 0; flow < PKT_FLOWS; flow++)
            for (int i = 0; i < CMP_COUNTERS; i++)
                printf(" %llu", (unsigned long long)counters[flow][i]);
        printf("\n");
    }
    cmp_free(c);
    return 0;
}
