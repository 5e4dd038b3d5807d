/* Command table and implementations, with Redis 7's reply and error texts.
 *
 * Every command reads time from net_clock(), one reading per loop iteration,
 * so a command, a pipelined batch and a whole MULTI/EXEC see one instant
 * (Redis also freezes time during a transaction). */
#include "kvstore.h"
#include "db.h"

#define NS_PER_MS 1000000ull
#define SWEEP_NS (100 * NS_PER_MS)          /* active expiry period */
#define KV_MAX_STRING (512ull << 20)         /* Redis's proto-max-bulk-len */
#define KV_VERSION "7.0.0"

static uint64_t start_ns, last_sweep_ns, next_client_id;
static size_t maxmemory, used_peak;

typedef void (*cmd_fn)(struct client *cl, struct arg *argv, size_t argc);

enum {
    CMD_DENYOOM = 1,    /* refused with -OOM while used memory > maxmemory */
    CMD_NOQUEUE = 2,    /* runs at once inside MULTI (EXEC, DISCARD, MULTI, WATCH, QUIT) */
};

struct command {
    const char *name;
    int arity;          /* Redis convention: n exact, -n at least n */
    cmd_fn fn;
    unsigned flags;
};

/* A command queued by MULTI: its arguments copied after the argv array. */
struct queued {
    const struct command *cmd;
    size_t argc;
    struct arg argv[];
};

struct multi_state {
    struct queued **cmds;
    size_t n, cap;
    bool aborted;       /* a command was refused while queueing: EXEC answers EXECABORT */
    bool denyoom;       /* a queued command may grow memory: EXEC obeys maxmemory */
};

/* WATCH: which client watches which key, and whether the key was live then. */
struct watch {
    struct client *cl;
    bool existed;
    size_t klen;
    uint8_t key[];
};

static struct watch **watches;
static size_t nwatches, watches_cap;

static const char oom_text[] = "OOM command not allowed when used memory > 'maxmemory'.";

static bool eq_nocase(const struct arg *a, const char *s)
{
    size_t n = strlen(s);
    if (a->len != n)
        return false;
    for (size_t i = 0; i < n; i++) {
        uint8_t c = a->p[i];
        if (c >= 'A' && c <= 'Z')
            c = (uint8_t)(c + 32);
        if (c != (uint8_t)s[i])
            return false;
    }
    return true;
}

static const char *err_int = "ERR value is not an integer or out of range";

static void cmd_ping(struct client *cl, struct arg *argv, size_t argc)
{
    if (argc > 2)
        reply_error(cl, "ERR wrong number of arguments for 'ping' command");
    else if (argc == 1)
        reply_status(cl, "PONG");
    else
        reply_bulk(cl, argv[1].p, argv[1].len);
}

static void cmd_echo(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    reply_bulk(cl, argv[1].p, argv[1].len);
}

static void reply_oom(struct client *cl)
{
    reply_error(cl, "%s", oom_text);
}

/* Copies at most max bytes of a (a NUL ends it early, as C strings do in
 * Redis's "%.128s"). */
static size_t clip(char *dst, const struct arg *a, size_t max)
{
    size_t n = 0;
    while (n < a->len && n < max && a->p[n])
        dst[n] = (char)a->p[n], n++;
    dst[n] = 0;
    return n;
}

/* ---- WATCH bookkeeping ---- */

/* A write to key: every client watching it fails its next EXEC. */
static void touch(const uint8_t *key, size_t klen)
{
    for (size_t i = 0; i < nwatches; i++)
        if (watches[i]->klen == klen && memcmp(watches[i]->key, key, klen) == 0)
            watches[i]->cl->watch_dirty = true;
}

static void touch_arg(const struct arg *key)
{
    touch(key->p, key->len);
}

static void unwatch_all(struct client *cl)
{
    if (!cl->watching)
        return;
    size_t kept = 0;
    for (size_t i = 0; i < nwatches; i++) {
        if (watches[i]->cl == cl)
            free(watches[i]);
        else
            watches[kept++] = watches[i];
    }
    nwatches = kept;
    cl->watching = 0;
    cl->watch_dirty = false;
}

/* True when EXEC must answer nil: a watched key was written, or was live
 * at WATCH time and has expired since (Redis 7 counts that as a change). */
static bool watch_broken(struct client *cl)
{
    if (cl->watch_dirty)
        return true;
    for (size_t i = 0; i < nwatches && cl->watching; i++) {
        struct watch *w = watches[i];
        if (w->cl == cl && w->existed && !db_get(w->key, w->klen))
            return true;
    }
    return false;
}

/* ---- memory ---- */

/* Redis's noeviction policy: over maxmemory, commands that may grow memory
 * are refused.  Keys past their TTL are reclaimed first, as the periodic
 * sweep would have. */
static bool over_maxmemory(void)
{
    if (!maxmemory || plat_heap_used() <= maxmemory)
        return false;
    if (db_volatile())
        db_size(NULL);
    return plat_heap_used() > maxmemory;
}

/* Redis's memtoull: digits with an optional b, k, kb, m, mb, g or gb. */
static bool parse_memory(const char *s, size_t *out)
{
    unsigned long long v = 0;
    const char *p = s;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (~0ull - 9) / 10)
            return false;
        v = v * 10 + (unsigned)(*p - '0');
    }
    static const struct { const char *suffix; unsigned long long mul; } units[] = {
        { "", 1 }, { "b", 1 }, { "k", 1000 }, { "kb", 1024 }, { "m", 1000000 },
        { "mb", 1048576 }, { "g", 1000000000 }, { "gb", 1073741824 },
    };
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        const char *a = p, *b = units[i].suffix;
        while (*a && *b && (*a | 32) == *b)
            a++, b++;
        if (*a || *b)
            continue;
        if (v > ~0ull / units[i].mul)
            return false;
        *out = (size_t)(v * units[i].mul);
        return true;
    }
    return false;
}

/* Redis's bytesToHuman: 1023B, 1.50K, 64.00M ... */
static size_t fmt_human(char *buf, size_t cap, unsigned long long n)
{
    static const char units[] = "BKMGTP";
    unsigned long long scale = 1;
    int u = 0;
    while (u < 5 && n / 1024 >= scale)
        scale *= 1024, u++;
    if (!u)
        return fmt_sn(buf, cap, "%lluB", n);
    unsigned long long hundredths = n / scale * 100 + (n % scale * 100 + scale / 2) / scale;
    return fmt_sn(buf, cap, "%llu.%02llu%c", hundredths / 100, hundredths % 100, units[u]);
}

static void cmd_set(struct client *cl, struct arg *argv, size_t argc)
{
    bool nx = false, xx = false, keepttl = false, has_ttl = false;
    uint64_t ttl_ns = 0;
    for (size_t i = 3; i < argc; i++) {
        struct arg *a = &argv[i];
        if (eq_nocase(a, "nx") && !xx) {
            nx = true;
        } else if (eq_nocase(a, "xx") && !nx) {
            xx = true;
        } else if (eq_nocase(a, "keepttl") && !has_ttl) {
            keepttl = true;
        } else if ((eq_nocase(a, "ex") || eq_nocase(a, "px")) && !has_ttl && !keepttl &&
                   i + 1 < argc) {
            bool secs = eq_nocase(a, "ex");
            long long v;
            if (!parse_ll(argv[i + 1].p, argv[i + 1].len, &v)) {
                reply_error(cl, "%s", err_int);
                return;
            }
            /* Also refuse TTLs whose deadline would overflow the clock. */
            if (v <= 0 || (unsigned long long)v > (secs ? 1000000000ull : 1000000000000ull)) {
                reply_error(cl, "ERR invalid expire time in 'set' command");
                return;
            }
            ttl_ns = (uint64_t)v * (secs ? 1000 * NS_PER_MS : NS_PER_MS);
            has_ttl = true;
            i++;
        } else {
            reply_error(cl, "ERR syntax error");
            return;
        }
    }
    struct kv_entry *e = db_get(argv[1].p, argv[1].len);
    if ((nx && e) || (xx && !e)) {
        reply_nil(cl);
        return;
    }
    e = db_set(argv[1].p, argv[1].len, argv[2].p, argv[2].len, keepttl);
    if (!e) {
        reply_oom(cl);
        return;
    }
    if (has_ttl)
        db_set_expire(e, net_clock() + ttl_ns);
    touch_arg(&argv[1]);
    reply_status(cl, "OK");
}

static void reply_value(struct client *cl, const struct arg *key)
{
    struct kv_entry *e = db_get(key->p, key->len);
    if (e)
        reply_bulk(cl, e->val, e->vlen);
    else
        reply_nil(cl);
}

static void cmd_get(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    reply_value(cl, &argv[1]);
}

static void cmd_del(struct client *cl, struct arg *argv, size_t argc)
{
    long long n = 0;
    for (size_t i = 1; i < argc; i++)
        if (db_del(argv[i].p, argv[i].len)) {
            touch_arg(&argv[i]);
            n++;
        }
    reply_int(cl, n);
}

static void cmd_exists(struct client *cl, struct arg *argv, size_t argc)
{
    long long n = 0;
    for (size_t i = 1; i < argc; i++)
        n += db_get(argv[i].p, argv[i].len) != NULL;
    reply_int(cl, n);
}

static void incr_by(struct client *cl, const struct arg *key, long long by)
{
    long long cur = 0;
    struct kv_entry *e = db_get(key->p, key->len);
    if (e && !parse_ll(e->val, e->vlen, &cur)) {
        reply_error(cl, "%s", err_int);
        return;
    }
    if ((by > 0 && cur > __LONG_LONG_MAX__ - by) ||
        (by < 0 && cur < -__LONG_LONG_MAX__ - 1 - by)) {
        reply_error(cl, "ERR increment or decrement would overflow");
        return;
    }
    cur += by;
    char num[24];
    size_t n = fmt_ll(num, cur);
    if (!db_set(key->p, key->len, (const uint8_t *)num, n, true)) {
        reply_oom(cl);
        return;
    }
    touch_arg(key);
    reply_int(cl, cur);
}

static void cmd_incr(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    incr_by(cl, &argv[1], 1);
}

static void cmd_decr(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    incr_by(cl, &argv[1], -1);
}

static void cmd_incrby(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    long long by;
    if (!parse_ll(argv[2].p, argv[2].len, &by)) {
        reply_error(cl, "%s", err_int);
        return;
    }
    incr_by(cl, &argv[1], by);
}

static void cmd_decrby(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    long long by;
    if (!parse_ll(argv[2].p, argv[2].len, &by)) {
        reply_error(cl, "%s", err_int);
        return;
    }
    if (by == -__LONG_LONG_MAX__ - 1) {
        reply_error(cl, "ERR decrement would overflow");
        return;
    }
    incr_by(cl, &argv[1], -by);
}

static void cmd_mset(struct client *cl, struct arg *argv, size_t argc)
{
    if (argc % 2 == 0) {
        reply_error(cl, "ERR wrong number of arguments for 'mset' command");
        return;
    }
    for (size_t i = 1; i < argc; i += 2) {
        if (!db_set(argv[i].p, argv[i].len, argv[i + 1].p, argv[i + 1].len, false)) {
            reply_oom(cl);
            return;
        }
        touch_arg(&argv[i]);
    }
    reply_status(cl, "OK");
}

static void cmd_mget(struct client *cl, struct arg *argv, size_t argc)
{
    reply_array(cl, argc - 1);
    for (size_t i = 1; i < argc; i++)
        reply_value(cl, &argv[i]);
}

static void cmd_dbsize(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    reply_int(cl, (long long)db_size(NULL));
}

static void cmd_flushall(struct client *cl, struct arg *argv, size_t argc)
{
    if (argc > 2 || (argc == 2 && !eq_nocase(&argv[1], "sync") && !eq_nocase(&argv[1], "async"))) {
        reply_error(cl, "ERR syntax error");
        return;
    }
    /* Redis fails the EXEC of every client watching a key that existed. */
    for (size_t i = 0; i < nwatches; i++)
        if (db_get(watches[i]->key, watches[i]->klen))
            watches[i]->cl->watch_dirty = true;
    db_flush();
    reply_status(cl, "OK");
}

static void cmd_info(struct client *cl, struct arg *argv, size_t argc)
{
    bool server = argc == 1, memory = argc == 1, keyspace = argc == 1;
    for (size_t i = 1; i < argc; i++) {
        if (eq_nocase(&argv[i], "server"))
            server = true;
        else if (eq_nocase(&argv[i], "memory"))
            memory = true;
        else if (eq_nocase(&argv[i], "keyspace"))
            keyspace = true;
        else if (eq_nocase(&argv[i], "all") || eq_nocase(&argv[i], "default") ||
                 eq_nocase(&argv[i], "everything"))
            server = memory = keyspace = true;
    }
    char text[1024];
    size_t n = 0;
    if (server)
        n += fmt_sn(text + n, sizeof text - n,
                    "# Server\r\nredis_version:" KV_VERSION "\r\nredis_mode:standalone\r\n"
                    "os:colo-appliance kvstore\r\narch_bits:64\r\ntcp_port:6379\r\n"
                    "uptime_in_seconds:%llu\r\n",
                    (unsigned long long)((net_clock() - start_ns) / 1000000000ull));
    if (memory) {
        /* Sizes of the guest heap: everything malloc'd (keys, values, client
         * buffers, TCP buffers) counts, as in Redis's used_memory. */
        size_t used = plat_heap_used(), heap = plat_heap_size();
        if (used > used_peak)
            used_peak = used;
        char h_used[32], h_peak[32], h_heap[32], h_max[32];
        fmt_human(h_used, sizeof h_used, used);
        fmt_human(h_peak, sizeof h_peak, used_peak);
        fmt_human(h_heap, sizeof h_heap, heap);
        fmt_human(h_max, sizeof h_max, maxmemory);
        n += fmt_sn(text + n, sizeof text - n,
                    "%s# Memory\r\nused_memory:%zu\r\nused_memory_human:%s\r\n"
                    "used_memory_peak:%zu\r\nused_memory_peak_human:%s\r\n"
                    "total_system_memory:%zu\r\ntotal_system_memory_human:%s\r\n"
                    "maxmemory:%zu\r\nmaxmemory_human:%s\r\nmaxmemory_policy:noeviction\r\n",
                    n ? "\r\n" : "", used, h_used, used_peak, h_peak, heap, h_heap,
                    maxmemory, h_max);
    }
    if (keyspace) {
        size_t ttl, keys = db_size(&ttl);
        n += fmt_sn(text + n, sizeof text - n, "%s# Keyspace\r\n", n ? "\r\n" : "");
        if (keys)
            n += fmt_sn(text + n, sizeof text - n, "db0:keys=%zu,expires=%zu,avg_ttl=0\r\n",
                        keys, ttl);
    }
    reply_bulk(cl, text, n);
}

/* ---- strings ---- */

static void cmd_strlen(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    struct kv_entry *e = db_get(argv[1].p, argv[1].len);
    reply_int(cl, e ? (long long)e->vlen : 0);
}

static void cmd_append(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    struct kv_entry *e = db_get(argv[1].p, argv[1].len);
    if (!e) {
        e = db_set(argv[1].p, argv[1].len, argv[2].p, argv[2].len, false);
    } else if (e->vlen + argv[2].len > KV_MAX_STRING) {
        reply_error(cl, "ERR string exceeds maximum allowed size (proto-max-bulk-len)");
        return;
    } else if (!db_append(e, argv[2].p, argv[2].len)) {
        e = NULL;
    }
    if (!e) {
        reply_oom(cl);
        return;
    }
    touch_arg(&argv[1]);
    reply_int(cl, (long long)e->vlen);
}

static void cmd_getset(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    /* The old value is replied before the set frees it; a failed set takes
     * that reply back and answers OOM instead. */
    size_t mark = cl->out.len;
    reply_value(cl, &argv[1]);
    if (!db_set(argv[1].p, argv[1].len, argv[2].p, argv[2].len, false)) {
        if (!cl->out.oom)
            cl->out.len = mark;
        reply_oom(cl);
        return;
    }
    touch_arg(&argv[1]);
}

static void cmd_type(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    reply_status(cl, db_get(argv[1].p, argv[1].len) ? "string" : "none");
}

/* ---- expiry ---- */

enum { EXPIRE_NX = 1, EXPIRE_XX = 2, EXPIRE_GT = 4, EXPIRE_LT = 8 };

/* EXPIRE/PEXPIRE key time [NX|XX|GT|LT].  A time in the past deletes the
 * key; deadlines are on the guest's monotonic clock. */
static void expire_generic(struct client *cl, struct arg *argv, size_t argc, bool seconds,
                           const char *name)
{
    unsigned flags = 0;
    for (size_t i = 3; i < argc; i++) {
        if (eq_nocase(&argv[i], "nx")) {
            flags |= EXPIRE_NX;
        } else if (eq_nocase(&argv[i], "xx")) {
            flags |= EXPIRE_XX;
        } else if (eq_nocase(&argv[i], "gt")) {
            flags |= EXPIRE_GT;
        } else if (eq_nocase(&argv[i], "lt")) {
            flags |= EXPIRE_LT;
        } else {
            char opt[129];
            clip(opt, &argv[i], 128);
            reply_error(cl, "ERR Unsupported option %s", opt);
            return;
        }
    }
    if ((flags & EXPIRE_NX) && (flags & (EXPIRE_XX | EXPIRE_GT | EXPIRE_LT))) {
        reply_error(cl, "ERR NX and XX, GT or LT options at the same time are not compatible");
        return;
    }
    if ((flags & EXPIRE_GT) && (flags & EXPIRE_LT)) {
        reply_error(cl, "ERR GT and LT options at the same time are not compatible");
        return;
    }
    long long t;
    if (!parse_ll(argv[2].p, argv[2].len, &t)) {
        reply_error(cl, "%s", err_int);
        return;
    }
    uint64_t now = net_clock();
    /* Redis refuses a time whose deadline overflows its clock; ours is in
     * nanoseconds, so the limit is about 584 years ahead. */
    if (seconds && (t > __LONG_LONG_MAX__ / 1000 || t < (-__LONG_LONG_MAX__ - 1) / 1000)) {
        reply_error(cl, "ERR invalid expire time in '%s' command", name);
        return;
    }
    long long ms = seconds ? t * 1000 : t;
    if (ms > 0 && (unsigned long long)ms > (UINT64_MAX - now) / NS_PER_MS) {
        reply_error(cl, "ERR invalid expire time in '%s' command", name);
        return;
    }
    bool past = ms <= 0;
    uint64_t deadline = past ? now : now + (uint64_t)ms * NS_PER_MS;
    struct kv_entry *e = db_get(argv[1].p, argv[1].len);
    if (!e || ((flags & EXPIRE_NX) && e->expire_ns) || ((flags & EXPIRE_XX) && !e->expire_ns) ||
        ((flags & EXPIRE_GT) && (!e->expire_ns || deadline <= e->expire_ns)) ||
        ((flags & EXPIRE_LT) && e->expire_ns && deadline >= e->expire_ns)) {
        reply_int(cl, 0);
        return;
    }
    if (past)
        db_del(argv[1].p, argv[1].len);
    else
        db_set_expire(e, deadline);
    touch_arg(&argv[1]);
    reply_int(cl, 1);
}

static void cmd_expire(struct client *cl, struct arg *argv, size_t argc)
{
    expire_generic(cl, argv, argc, true, "expire");
}

static void cmd_pexpire(struct client *cl, struct arg *argv, size_t argc)
{
    expire_generic(cl, argv, argc, false, "pexpire");
}

/* TTL/PTTL: -2 without the key, -1 without a TTL; TTL rounds to seconds. */
static void ttl_generic(struct client *cl, const struct arg *key, bool ms)
{
    struct kv_entry *e = db_get(key->p, key->len);
    if (!e) {
        reply_int(cl, -2);
        return;
    }
    if (!e->expire_ns) {
        reply_int(cl, -1);
        return;
    }
    long long left = (long long)((e->expire_ns - net_clock()) / NS_PER_MS);
    reply_int(cl, ms ? left : (left + 500) / 1000);
}

static void cmd_ttl(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    ttl_generic(cl, &argv[1], false);
}

static void cmd_pttl(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    ttl_generic(cl, &argv[1], true);
}

static void cmd_persist(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    struct kv_entry *e = db_get(argv[1].p, argv[1].len);
    if (!e || !e->expire_ns) {
        reply_int(cl, 0);
        return;
    }
    db_set_expire(e, 0);
    touch_arg(&argv[1]);
    reply_int(cl, 1);
}

/* ---- KEYS and SCAN ---- */

/* What KEYS and SCAN look for; they count in one pass and reply in a second
 * over the same keys, so they need no memory (they work when out of it). */
struct key_filter {
    const struct arg *pattern;  /* NULL: every key */
    bool type_matches;          /* SCAN TYPE: only "string" exists here */
    struct client *reply_to;    /* NULL in the counting pass */
    size_t seen, matched;
};

static void filter_key(struct kv_entry *e, void *arg)
{
    struct key_filter *f = arg;
    f->seen++;
    if (!f->type_matches ||
        (f->pattern && !glob_match(f->pattern->p, f->pattern->len, e->key, e->klen, false)))
        return;
    f->matched++;
    if (f->reply_to)
        reply_bulk(f->reply_to, e->key, e->klen);
}

static void cmd_keys(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    bool all = argv[1].len == 1 && argv[1].p[0] == '*';
    struct key_filter f = { all ? NULL : &argv[1], true, NULL, 0, 0 };
    db_foreach(filter_key, &f);
    reply_array(cl, f.matched);
    f.reply_to = cl;
    db_foreach(filter_key, &f);
}

static bool parse_cursor(const struct arg *a, uint64_t *out)
{
    uint64_t v = 0;
    if (a->len == 0 || a->len > 20)
        return false;
    for (size_t i = 0; i < a->len; i++) {
        unsigned d = (unsigned)(a->p[i] - '0');
        if (d > 9 || v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    *out = v;
    return true;
}

/* Redis's scan loop: buckets until COUNT keys were seen (before MATCH and
 * TYPE filter them) or 10 * COUNT buckets were visited. */
static uint64_t scan_round(uint64_t cursor, long long count, struct key_filter *f)
{
    long long budget = count * 10;
    do
        cursor = db_scan(cursor, filter_key, f);
    while (cursor && budget-- && f->seen < (unsigned long long)count);
    return cursor;
}

static void cmd_scan(struct client *cl, struct arg *argv, size_t argc)
{
    uint64_t cursor;
    if (!parse_cursor(&argv[1], &cursor)) {
        reply_error(cl, "ERR invalid cursor");
        return;
    }
    struct key_filter f = { NULL, true, NULL, 0, 0 };
    long long count = 10;
    for (size_t i = 2; i < argc; i += 2) {
        if (i + 1 >= argc) {
            reply_error(cl, "ERR syntax error");
            return;
        }
        if (eq_nocase(&argv[i], "count")) {
            if (!parse_ll(argv[i + 1].p, argv[i + 1].len, &count)) {
                reply_error(cl, "%s", err_int);
                return;
            }
            if (count < 1) {
                reply_error(cl, "ERR syntax error");
                return;
            }
            if (count > __LONG_LONG_MAX__ / 10)
                count = __LONG_LONG_MAX__ / 10;
        } else if (eq_nocase(&argv[i], "match")) {
            bool all = argv[i + 1].len == 1 && argv[i + 1].p[0] == '*';
            f.pattern = all ? NULL : &argv[i + 1];
        } else if (eq_nocase(&argv[i], "type")) {
            f.type_matches = eq_nocase(&argv[i + 1], "string");
        } else {
            reply_error(cl, "ERR syntax error");
            return;
        }
    }
    uint64_t next = scan_round(cursor, count, &f);
    char num[24];
    size_t n = fmt_sn(num, sizeof num, "%llu", (unsigned long long)next);
    reply_array(cl, 2);
    reply_bulk(cl, num, n);
    reply_array(cl, f.matched);
    f.reply_to = cl;
    f.seen = f.matched = 0;
    scan_round(cursor, count, &f);
}

/* ---- transactions ---- */

static void multi_free(struct multi_state *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->cmds[i]);
    free(m->cmds);
    free(m);
}

static void discard_transaction(struct client *cl)
{
    if (cl->multi)
        multi_free(cl->multi);
    cl->multi = NULL;
    unwatch_all(cl);
}

/* A command refused while queueing: the transaction cannot be executed. */
static void flag_transaction(struct client *cl)
{
    if (cl->multi)
        cl->multi->aborted = true;
}

static bool queue_command(struct multi_state *m, const struct command *c, const struct arg *argv,
                          size_t argc)
{
    size_t bytes = sizeof(struct queued) + argc * sizeof(struct arg);
    for (size_t i = 0; i < argc; i++)
        bytes += argv[i].len;
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 8;
        struct queued **cmds = realloc(m->cmds, cap * sizeof *cmds);
        if (!cmds)
            return false;
        m->cmds = cmds;
        m->cap = cap;
    }
    struct queued *q = malloc(bytes);
    if (!q)
        return false;
    q->cmd = c;
    q->argc = argc;
    uint8_t *data = (uint8_t *)&q->argv[argc];
    for (size_t i = 0; i < argc; i++) {
        memcpy(data, argv[i].p, argv[i].len);
        q->argv[i] = (struct arg){ data, argv[i].len };
        data += argv[i].len;
    }
    m->cmds[m->n++] = q;
    m->denyoom |= (c->flags & CMD_DENYOOM) != 0;
    return true;
}

static void cmd_multi(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    if (cl->multi) {
        reply_error(cl, "ERR MULTI calls can not be nested");
        return;
    }
    if (!(cl->multi = calloc(1, sizeof *cl->multi))) {
        reply_oom(cl);
        return;
    }
    reply_status(cl, "OK");
}

static void cmd_exec(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    struct multi_state *m = cl->multi;
    if (!m) {
        reply_error(cl, "ERR EXEC without MULTI");
        return;
    }
    if (m->aborted) {
        reply_error(cl, "EXECABORT Transaction discarded because of previous errors.");
    } else if (watch_broken(cl)) {
        reply_raw(cl, "*-1\r\n");
    } else {
        /* All in this call: no other client runs in between. */
        reply_array(cl, m->n);
        for (size_t i = 0; i < m->n; i++)
            m->cmds[i]->cmd->fn(cl, m->cmds[i]->argv, m->cmds[i]->argc);
    }
    discard_transaction(cl);
}

static void cmd_discard(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    if (!cl->multi) {
        reply_error(cl, "ERR DISCARD without MULTI");
        return;
    }
    discard_transaction(cl);
    reply_status(cl, "OK");
}

static void cmd_watch(struct client *cl, struct arg *argv, size_t argc)
{
    if (cl->multi) {
        reply_error(cl, "ERR WATCH inside MULTI is not allowed");
        return;
    }
    for (size_t i = 1; i < argc; i++) {
        bool already = false;
        for (size_t w = 0; w < nwatches && !already; w++)
            already = watches[w]->cl == cl && watches[w]->klen == argv[i].len &&
                      memcmp(watches[w]->key, argv[i].p, argv[i].len) == 0;
        if (already)
            continue;
        if (nwatches == watches_cap) {
            size_t cap = watches_cap ? watches_cap * 2 : 16;
            struct watch **grown = realloc(watches, cap * sizeof *grown);
            if (!grown) {
                reply_oom(cl);
                return;
            }
            watches = grown;
            watches_cap = cap;
        }
        struct watch *w = malloc(sizeof *w + argv[i].len);
        if (!w) {
            reply_oom(cl);
            return;
        }
        w->cl = cl;
        w->existed = db_get(argv[i].p, argv[i].len) != NULL;
        w->klen = argv[i].len;
        memcpy(w->key, argv[i].p, argv[i].len);
        watches[nwatches++] = w;
        cl->watching++;
    }
    reply_status(cl, "OK");
}

static void cmd_unwatch(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    unwatch_all(cl);
    reply_status(cl, "OK");
}

/* ---- connection ---- */

/* Redis's validateClientName: printable ASCII without spaces. */
static bool valid_client_name(const struct arg *a)
{
    for (size_t i = 0; i < a->len; i++)
        if (a->p[i] < '!' || a->p[i] > '~')
            return false;
    return true;
}

static bool set_client_name(struct client *cl, const struct arg *a)
{
    char *name = NULL;
    if (a->len) {
        if (!(name = malloc(a->len + 1)))
            return false;
        memcpy(name, a->p, a->len);
        name[a->len] = 0;
    }
    free(cl->name);
    cl->name = name;
    return true;
}

static const char err_client_name[] =
    "ERR Client names cannot contain spaces, newlines or special characters.";

static void cmd_client(struct client *cl, struct arg *argv, size_t argc)
{
    char sub[129];
    clip(sub, &argv[1], 128);
    if (eq_nocase(&argv[1], "setname") && argc == 3) {
        if (!valid_client_name(&argv[2]))
            reply_error(cl, "%s", err_client_name);
        else if (!set_client_name(cl, &argv[2]))
            reply_oom(cl);
        else
            reply_status(cl, "OK");
    } else if (eq_nocase(&argv[1], "getname") && argc == 2) {
        if (cl->name)
            reply_bulk(cl, cl->name, strlen(cl->name));
        else
            reply_nil(cl);
    } else if (eq_nocase(&argv[1], "id") && argc == 2) {
        reply_int(cl, (long long)cl->id);
    } else if (eq_nocase(&argv[1], "setinfo") && argc == 4) {
        /* Redis 7.2's library name/version: accepted, as clients send them on connect. */
        if (!eq_nocase(&argv[2], "lib-name") && !eq_nocase(&argv[2], "lib-ver")) {
            char opt[129];
            clip(opt, &argv[2], 128);
            reply_error(cl, "ERR Unrecognized option '%s'", opt);
        } else if (!valid_client_name(&argv[3])) {
            reply_error(cl, "ERR %s cannot contain spaces, newlines or special characters.",
                        eq_nocase(&argv[2], "lib-name") ? "lib-name" : "lib-ver");
        } else {
            reply_status(cl, "OK");
        }
    } else if (eq_nocase(&argv[1], "setname") || eq_nocase(&argv[1], "getname") ||
               eq_nocase(&argv[1], "id") || eq_nocase(&argv[1], "setinfo")) {
        for (char *c = sub; *c; c++) /* Redis names the subcommand in lower case here */
            if (*c >= 'A' && *c <= 'Z')
                *c = (char)(*c + 32);
        reply_error(cl, "ERR wrong number of arguments for 'client|%s' command", sub);
    } else {
        reply_error(cl, "ERR unknown subcommand '%s'. Try CLIENT HELP.", sub);
    }
}

/* HELLO [protover [AUTH user pass] [SETNAME name]]: this server speaks
 * RESP2 only, so protocol 3 is refused the way Redis refuses versions it
 * does not know, and the reply map is sent as a flat array. */
static void cmd_hello(struct client *cl, struct arg *argv, size_t argc)
{
    size_t next = 1;
    if (argc >= 2) {
        long long ver;
        if (!parse_ll(argv[1].p, argv[1].len, &ver)) {
            reply_error(cl, "ERR Protocol version is not an integer or out of range");
            return;
        }
        if (ver != 2) {
            reply_error(cl, "NOPROTO unsupported protocol version");
            return;
        }
        next = 2;
    }
    const struct arg *user = NULL, *name = NULL;
    for (size_t i = next; i < argc; i++) {
        size_t more = argc - 1 - i;
        if (eq_nocase(&argv[i], "auth") && more >= 2) {
            user = &argv[i + 1];
            i += 2;
        } else if (eq_nocase(&argv[i], "setname") && more >= 1) {
            name = &argv[++i];
            if (!valid_client_name(name)) {
                reply_error(cl, "%s", err_client_name);
                return;
            }
        } else {
            char opt[129];
            clip(opt, &argv[i], 128);
            reply_error(cl, "ERR Syntax error in HELLO option '%s'", opt);
            return;
        }
    }
    /* No passwords are configured: the default user takes any password. */
    if (user && !(user->len == 7 && memcmp(user->p, "default", 7) == 0)) {
        reply_error(cl, "WRONGPASS invalid username-password pair or user is disabled.");
        return;
    }
    if (name && !set_client_name(cl, name)) {
        reply_oom(cl);
        return;
    }
    reply_array(cl, 14);
    reply_bulk(cl, "server", 6);
    reply_bulk(cl, "redis", 5);
    reply_bulk(cl, "version", 7);
    reply_bulk(cl, KV_VERSION, strlen(KV_VERSION));
    reply_bulk(cl, "proto", 5);
    reply_int(cl, 2);
    reply_bulk(cl, "id", 2);
    reply_int(cl, (long long)cl->id);
    reply_bulk(cl, "mode", 4);
    reply_bulk(cl, "standalone", 10);
    reply_bulk(cl, "role", 4);
    reply_bulk(cl, "master", 6);
    reply_bulk(cl, "modules", 7);
    reply_array(cl, 0);
}

static void cmd_command(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    reply_array(cl, 0);
}

/* CONFIG GET answers the parameters redis-benchmark and memory tools ask
 * for (glob patterns allowed, as in Redis 7), with the values of a server
 * that never persists; anything else matches nothing. */
static void cmd_config(struct client *cl, struct arg *argv, size_t argc)
{
    if (!eq_nocase(&argv[1], "get")) {
        char sub[129];
        clip(sub, &argv[1], 128);
        reply_error(cl, "ERR unknown subcommand '%s'. Try CONFIG HELP.", sub);
        return;
    }
    if (argc < 3) {
        reply_error(cl, "ERR wrong number of arguments for 'config|get' command");
        return;
    }
    char maxmem[24];
    fmt_sn(maxmem, sizeof maxmem, "%zu", maxmemory);
    const char *const params[][2] = {
        { "save", "" }, { "appendonly", "no" }, { "maxmemory", maxmem },
        { "maxmemory-policy", "noeviction" },
    };
    enum { NPARAMS = sizeof params / sizeof params[0] };
    bool want[NPARAMS] = { false };
    size_t n = 0;
    for (size_t i = 2; i < argc; i++)
        for (size_t p = 0; p < NPARAMS; p++)
            if (!want[p] && glob_match(argv[i].p, argv[i].len, (const uint8_t *)params[p][0],
                                       strlen(params[p][0]), true)) {
                want[p] = true;
                n++;
            }
    reply_array(cl, 2 * n);
    for (size_t p = 0; p < NPARAMS; p++)
        if (want[p]) {
            reply_bulk(cl, params[p][0], strlen(params[p][0]));
            reply_bulk(cl, params[p][1], strlen(params[p][1]));
        }
}

static void cmd_select(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argc;
    long long db;
    if (!parse_ll(argv[1].p, argv[1].len, &db))
        reply_error(cl, "%s", err_int);
    else if (db != 0)
        reply_error(cl, "ERR DB index is out of range");
    else
        reply_status(cl, "OK");
}

static void cmd_quit(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    reply_status(cl, "OK");
    cl->close_after = true;
}

static const struct command commands[] = {
    { "ping", -1, cmd_ping, 0 },            { "echo", 2, cmd_echo, 0 },
    { "set", -3, cmd_set, CMD_DENYOOM },    { "get", 2, cmd_get, 0 },
    { "del", -2, cmd_del, 0 },              { "exists", -2, cmd_exists, 0 },
    { "incr", 2, cmd_incr, CMD_DENYOOM },   { "incrby", 3, cmd_incrby, CMD_DENYOOM },
    { "decr", 2, cmd_decr, CMD_DENYOOM },   { "decrby", 3, cmd_decrby, CMD_DENYOOM },
    { "mset", -3, cmd_mset, CMD_DENYOOM },  { "mget", -2, cmd_mget, 0 },
    { "strlen", 2, cmd_strlen, 0 },         { "append", 3, cmd_append, CMD_DENYOOM },
    { "getset", 3, cmd_getset, CMD_DENYOOM }, { "type", 2, cmd_type, 0 },
    { "expire", -3, cmd_expire, 0 },        { "pexpire", -3, cmd_pexpire, 0 },
    { "ttl", 2, cmd_ttl, 0 },               { "pttl", 2, cmd_pttl, 0 },
    { "persist", 2, cmd_persist, 0 },       { "keys", 2, cmd_keys, 0 },
    { "scan", -2, cmd_scan, 0 },            { "dbsize", 1, cmd_dbsize, 0 },
    { "flushall", -1, cmd_flushall, 0 },    { "info", -1, cmd_info, 0 },
    { "multi", 1, cmd_multi, CMD_NOQUEUE }, { "exec", 1, cmd_exec, CMD_NOQUEUE },
    { "discard", 1, cmd_discard, CMD_NOQUEUE }, { "watch", -2, cmd_watch, CMD_NOQUEUE },
    { "unwatch", 1, cmd_unwatch, 0 },       { "client", -2, cmd_client, 0 },
    { "hello", -1, cmd_hello, 0 },          { "command", -1, cmd_command, 0 },
    { "config", -2, cmd_config, 0 },        { "select", 2, cmd_select, 0 },
    { "quit", -1, cmd_quit, CMD_NOQUEUE },
};

static void reply_unknown(struct client *cl, struct arg *argv, size_t argc)
{
    char name[129], args[260];
    size_t alen = 0;
    clip(name, &argv[0], 128);
    /* Redis: "'%.*s' " per argument while the list is under 128 bytes. */
    for (size_t i = 1; i < argc && alen < 128; i++) {
        args[alen++] = '\'';
        alen += clip(args + alen, &argv[i], 128 - (alen - 1));
        args[alen++] = '\'';
        args[alen++] = ' ';
    }
    args[alen] = 0;
    reply_error(cl, "ERR unknown command '%s', with args beginning with: %s", name, args);
}

int kv_init(void)
{
    start_ns = net_clock();
    size_t heap = plat_heap_size();
    /* Keep an eighth of the heap (at least 2 MiB) out of the key space's
     * reach: connections, their buffers and the TCP stack need it to go on
     * answering, -OOM included, once the data fills maxmemory. */
    size_t reserve = heap / 8 > (2u << 20) ? heap / 8 : (2u << 20);
    maxmemory = heap > 2 * reserve ? heap - reserve : heap / 2;
    char text[64];
    if (cmdline_get(plat_cmdline(), "maxmemory", text, sizeof text) >= 0 &&
        !parse_memory(text, &maxmemory)) {
        net_log("kvstore: bad maxmemory=%s (bytes, or with k, kb, m, mb, g, gb)", text);
        return -1;
    }
    return 0;
}

void kv_client_init(struct client *cl)
{
    cl->id = ++next_client_id;
}

void kv_client_gone(struct client *cl)
{
    discard_transaction(cl);
    free(cl->name);
    cl->name = NULL;
}

uint64_t kv_sweep_deadline(void)
{
    return db_volatile() ? last_sweep_ns + SWEEP_NS : UINT64_MAX;
}

void kv_sweep(void)
{
    uint64_t now = net_clock();
    if (!db_volatile() || now < last_sweep_ns + SWEEP_NS)
        return;
    last_sweep_ns = now;
    /* A sixteenth of the table per period: every key is checked within
     * 1.6 s, and a million-key table costs well under a millisecond a time. */
    size_t budget = db_buckets() / 16;
    db_sweep(budget > 1024 ? budget : 1024);
}

static const struct command *lookup(const struct arg *name)
{
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (eq_nocase(name, commands[i].name))
            return &commands[i];
    return NULL;
}

void kv_execute(struct client *cl, size_t argc)
{
    struct arg *argv = cl->argv;
    const struct command *c = lookup(&argv[0]);
    if (!c) {
        reply_unknown(cl, argv, argc);
        flag_transaction(cl);
        return;
    }
    if ((c->arity > 0 && argc != (size_t)c->arity) || (c->arity < 0 && argc < (size_t)-c->arity)) {
        reply_error(cl, "ERR wrong number of arguments for '%s' command", c->name);
        flag_transaction(cl);
        return;
    }
    if (cl->multi && !(c->flags & CMD_NOQUEUE)) {
        /* Queueing takes memory: over maxmemory every queued command is refused. */
        if (over_maxmemory() || !queue_command(cl->multi, c, argv, argc)) {
            reply_oom(cl);
            flag_transaction(cl);
        } else {
            reply_status(cl, "QUEUED");
        }
        return;
    }
    bool denyoom = (c->flags & CMD_DENYOOM) || (c->fn == cmd_exec && cl->multi && cl->multi->denyoom);
    if (denyoom && over_maxmemory()) {
        if (c->fn == cmd_exec) {
            discard_transaction(cl);
            reply_error(cl, "EXECABORT Transaction discarded because of: %s", oom_text);
        } else {
            reply_oom(cl);
        }
        return;
    }
    c->fn(cl, argv, argc);
    size_t used = plat_heap_used();
    if (used > used_peak)
        used_peak = used;
}
