/*
 * platform.h on Linux, for testing guest programs on the host.
 *
 * Live mode: frames go to and from a tap device (HOSTED_TAP or argv
 * "tap=NAME", default tap0).  The clock is CLOCK_MONOTONIC sampled when
 * plat_poll() returns, so the guest sees one time per loop iteration and a
 * recording of (wake-up time, frames read) is everything it took as input.
 *
 * Replay mode (HOSTED_REPLAY=file): the guest's wake-ups and frames come
 * from such a recording instead of the tap, so a run is a pure function of
 * the file; it exits with status 0 when the recording ends.
 *
 * Recordings (HOSTED_RECORD_IN for input, HOSTED_RECORD_OUT for frames sent)
 * are "HREC0002", u64 start_ns, then records u64 ns, u32 len, len bytes, in
 * host byte order.  In input recordings len 0 marks a plat_poll() return.
 * HOSTED_DROP_EVERY=N drops every Nth received and every Nth transmitted
 * frame (separate counters), and HOSTED_REORDER_EVERY=N delivers every Nth
 * received frame after the one that follows it, to exercise loss recovery
 * and reordering without netem.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "platform.h"

#define REC_MAGIC "HREC0002"
#define FAKE_WALL_BASE 1700000000000000000ull

static int tap_fd = -1;
static char cmdline[4096];
static uint8_t mac[6] = { 0x52, 0x54, 0x00, 0x12, 0x34, 0x56 };
static unsigned long drop_every, rx_count, tx_count;
static unsigned long reorder_every, reorder_count;
static uint8_t held[65536];     /* a received frame delivered after its successor */
static size_t held_len;
static bool held_due;           /* its successor went out: deliver it next */
static int rec_in_fd = -1, rec_out_fd = -1;

static uint64_t clock_now;     /* the guest's time, set at each plat_poll() return */

static FILE *replay;
static bool replay_have;       /* a record is loaded in replay_* */
static uint64_t replay_ts;
static uint32_t replay_len;
static uint8_t replay_frame[65536];

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* libc's malloc has no fixed heap; under ASan its allocator keeps the count. */
#if defined(__SANITIZE_ADDRESS__)
size_t __sanitizer_get_current_allocated_bytes(void);   /* sanitizer/allocator_interface.h */
size_t plat_heap_used(void)
{
    return __sanitizer_get_current_allocated_bytes();
}
#else
size_t plat_heap_used(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks + mi.hblkhd;
}
#endif

size_t plat_heap_size(void)
{
    return 0;
}

uint64_t plat_now_ns(void)
{
    return clock_now;
}

uint64_t plat_wall_ns(void)
{
    if (replay)
        return FAKE_WALL_BASE + clock_now;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void plat_console_write(const char *s, size_t n)
{
    while (n) {
        ssize_t w = write(1, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

static void write_all(int fd, const void *p, size_t n)
{
    const char *s = p;
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w <= 0) {
            perror("hosted: record");
            exit(2);
        }
        s += w;
        n -= (size_t)w;
    }
}

static void record(int fd, const void *frame, uint32_t len)
{
    uint64_t ts = clock_now;
    uint8_t hdr[12];
    memcpy(hdr, &ts, 8);
    memcpy(hdr + 8, &len, 4);
    write_all(fd, hdr, sizeof hdr);
    write_all(fd, frame, len);
}

static int open_record(const char *path, uint64_t start)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(path);
        exit(2);
    }
    write_all(fd, REC_MAGIC, 8);
    write_all(fd, &start, 8);
    return fd;
}

/* Loads the next record into replay_*; replay_have is false at the end. */
static void replay_next(void)
{
    uint8_t hdr[12];
    replay_have = false;
    if (fread(hdr, 1, 12, replay) != 12)
        return;
    memcpy(&replay_ts, hdr, 8);
    memcpy(&replay_len, hdr + 8, 4);
    if (replay_len > sizeof replay_frame || fread(replay_frame, 1, replay_len, replay) != replay_len) {
        fprintf(stderr, "hosted: truncated replay file\n");
        exit(2);
    }
    replay_have = true;
}

/* The guest wakes when the recorded guest woke, whatever its deadline. */
static bool replay_poll(void)
{
    if (!replay_have)
        exit(0);
    if (replay_len != 0) {
        fprintf(stderr, "hosted: replay out of step (frame where a wake-up was recorded)\n");
        exit(2);
    }
    clock_now = replay_ts;
    replay_next();
    return replay_have && replay_len != 0;
}

bool plat_poll(uint64_t deadline_ns)
{
    if (replay)
        return replay_poll();
    struct pollfd pfd = { .fd = tap_fd, .events = POLLIN };
    for (;;) {
        struct timespec ts, *tsp = NULL;
        if (deadline_ns != UINT64_MAX) {
            uint64_t now = mono_ns();
            uint64_t left = deadline_ns > now ? deadline_ns - now : 0;
            ts.tv_sec = (time_t)(left / 1000000000ull);
            ts.tv_nsec = (long)(left % 1000000000ull);
            tsp = &ts;
        }
        if (held_len) {
            ts.tv_sec = ts.tv_nsec = 0; /* a held frame is ready now */
            tsp = &ts;
        }
        int r = ppoll(&pfd, 1, tsp, NULL);
        if (r > 0 && (pfd.revents & (POLLERR | POLLHUP | POLLNVAL))) {
            fprintf(stderr, "hosted: tap device gone\n");
            exit(3); /* rather than spin on a dead descriptor */
        }
        if (r >= 0) {
            clock_now = mono_ns();
            if (rec_in_fd >= 0)
                record(rec_in_fd, "", 0);
            return held_len || (r > 0 && (pfd.revents & POLLIN));
        }
        if (errno != EINTR) {
            perror("hosted: ppoll");
            exit(2);
        }
    }
}

/* Frames are recorded as the guest gets them, after drops and reordering. */
static size_t delivered(const void *frame, size_t n)
{
    if (rec_in_fd >= 0)
        record(rec_in_fd, frame, (uint32_t)n);
    return n;
}

size_t plat_net_read(void *frame, size_t cap)
{
    if (replay) {
        if (!replay_have || replay_len == 0)
            return 0;
        size_t n = replay_len < cap ? replay_len : cap;
        memcpy(frame, replay_frame, n);
        replay_next();
        return n;
    }
    for (;;) {
        if (held_len && held_due)
            break;
        ssize_t n = read(tap_fd, frame, cap);
        if (n <= 0)
            break;
        if (drop_every && ++rx_count % drop_every == 0)
            continue;
        if (!held_len && reorder_every && ++reorder_count % reorder_every == 0 &&
            (size_t)n <= sizeof held) {
            memcpy(held, frame, (size_t)n);
            held_len = (size_t)n;
            continue;
        }
        held_due = held_len != 0;
        return delivered(frame, (size_t)n);
    }
    if (!held_len)
        return 0;
    /* The held frame goes after its successor, or alone if none came. */
    size_t n = held_len < cap ? held_len : cap;
    memcpy(frame, held, n);
    held_len = 0;
    held_due = false;
    return delivered(frame, n);
}

int plat_net_write(const void *frame, size_t len)
{
    if (drop_every && ++tx_count % drop_every == 0)
        return 0; /* lost on the wire: the sender cannot tell */
    if (rec_out_fd >= 0)
        record(rec_out_fd, frame, (uint32_t)len);
    if (replay)
        return 0;
    return write(tap_fd, frame, len) == (ssize_t)len ? 0 : -1;
}

void plat_net_mac(uint8_t out[6])
{
    memcpy(out, mac, 6);
}

uint64_t plat_block_sectors(void)
{
    return 0;
}

int plat_block_read(uint64_t sector, void *buf, size_t count)
{
    (void)sector, (void)buf, (void)count;
    return -1;
}

int plat_block_write(uint64_t sector, const void *buf, size_t count)
{
    (void)sector, (void)buf, (void)count;
    return -1;
}

const char *plat_cmdline(void)
{
    return cmdline;
}

void plat_halt(int status)
{
    exit(status);
}

static int open_tap(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        perror("hosted: /dev/net/tun");
        exit(2);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        perror("hosted: TUNSETIFF");
        exit(2);
    }
    return fd;
}

static void parse_mac(const char *s)
{
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) {
        fprintf(stderr, "hosted: bad HOSTED_MAC %s\n", s);
        exit(2);
    }
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)v[i];
}

static uint64_t open_replay(const char *path)
{
    replay = fopen(path, "rb");
    char magic[8];
    uint64_t start;
    if (!replay || fread(magic, 1, 8, replay) != 8 || memcmp(magic, REC_MAGIC, 8) != 0 ||
        fread(&start, 1, 8, replay) != 8) {
        fprintf(stderr, "hosted: bad replay file %s\n", path);
        exit(2);
    }
    replay_next();
    return start;
}

int main(int argc, char **argv)
{
    const char *tap = getenv("HOSTED_TAP");
    size_t len = 0;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "tap=", 4) == 0)
            tap = argv[i] + 4;
        int n = snprintf(cmdline + len, sizeof cmdline - len, "%s%s", len ? " " : "", argv[i]);
        if (n < 0 || (size_t)n >= sizeof cmdline - len) {
            fprintf(stderr, "hosted: command line too long\n");
            return 2;
        }
        len += (size_t)n;
    }
    const char *env = getenv("HOSTED_MAC");
    if (env)
        parse_mac(env);
    env = getenv("HOSTED_DROP_EVERY");
    if (env)
        drop_every = strtoul(env, NULL, 10);
    env = getenv("HOSTED_REORDER_EVERY");
    if (env)
        reorder_every = strtoul(env, NULL, 10);

    uint64_t start;
    env = getenv("HOSTED_REPLAY");
    if (env) {
        start = open_replay(env);
    } else {
        tap_fd = open_tap(tap ? tap : "tap0");
        start = mono_ns();
    }
    clock_now = start;
    env = getenv("HOSTED_RECORD_IN");
    if (env && !replay)
        rec_in_fd = open_record(env, start);
    env = getenv("HOSTED_RECORD_OUT");
    if (env)
        rec_out_fd = open_record(env, start);
    return guest_main();
}
