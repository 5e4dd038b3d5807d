/* Command table and implementations, with Redis 7's reply and error texts. */
#include "kvstore.h"
#include "db.h"

#define NS_PER_MS 1000000ull

static uint64_t start_ns;

typedef void (*cmd_fn)(struct client *cl, struct arg *argv, size_t argc);

struct command {
    const char *name;
    int arity;          /* Redis convention: n exact, -n at least n */
    cmd_fn fn;
};

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
    reply_error(cl, "OOM command not allowed when used memory > 'maxmemory'.");
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
        e->expire_ns = net_clock() + ttl_ns;
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
        n += db_del(argv[i].p, argv[i].len);
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
    for (size_t i = 1; i < argc; i += 2)
        if (!db_set(argv[i].p, argv[i].len, argv[i + 1].p, argv[i + 1].len, false)) {
            reply_oom(cl);
            return;
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
    db_flush();
    reply_status(cl, "OK");
}

static void cmd_info(struct client *cl, struct arg *argv, size_t argc)
{
    bool server = argc == 1, keyspace = argc == 1;
    for (size_t i = 1; i < argc; i++) {
        if (eq_nocase(&argv[i], "server"))
            server = true;
        else if (eq_nocase(&argv[i], "keyspace"))
            keyspace = true;
        else if (eq_nocase(&argv[i], "all") || eq_nocase(&argv[i], "default") ||
                 eq_nocase(&argv[i], "everything"))
            server = keyspace = true;
    }
    char text[512];
    size_t n = 0;
    if (server)
        n += fmt_sn(text + n, sizeof text - n,
                    "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\n"
                    "os:colo-appliance kvstore\r\narch_bits:64\r\ntcp_port:6379\r\n"
                    "uptime_in_seconds:%llu\r\n",
                    (unsigned long long)((net_clock() - start_ns) / 1000000000ull));
    if (server && keyspace)
        n += fmt_sn(text + n, sizeof text - n, "\r\n");
    if (keyspace) {
        size_t ttl, keys = db_size(&ttl);
        n += fmt_sn(text + n, sizeof text - n, "# Keyspace\r\n");
        if (keys)
            n += fmt_sn(text + n, sizeof text - n, "db0:keys=%zu,expires=%zu,avg_ttl=0\r\n",
                        keys, ttl);
    }
    reply_bulk(cl, text, n);
}

static void cmd_command(struct client *cl, struct arg *argv, size_t argc)
{
    (void)argv;
    (void)argc;
    reply_array(cl, 0);
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

/* CONFIG GET answers the two parameters redis-benchmark asks for, with the
 * values of a server that never persists; anything else matches nothing. */
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
    static const char *const params[][2] = { { "save", "" }, { "appendonly", "no" } };
    bool want[2] = { false, false };
    size_t n = 0;
    for (size_t i = 2; i < argc; i++)
        for (size_t p = 0; p < 2; p++)
            if (eq_nocase(&argv[i], params[p][0]) && !want[p]) {
                want[p] = true;
                n++;
            }
    reply_array(cl, 2 * n);
    for (size_t p = 0; p < 2; p++)
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
    { "ping", -1, cmd_ping },       { "echo", 2, cmd_echo },
    { "set", -3, cmd_set },         { "get", 2, cmd_get },
    { "del", -2, cmd_del },         { "exists", -2, cmd_exists },
    { "incr", 2, cmd_incr },        { "incrby", 3, cmd_incrby },
    { "decr", 2, cmd_decr },        { "decrby", 3, cmd_decrby },
    { "mset", -3, cmd_mset },       { "mget", -2, cmd_mget },
    { "dbsize", 1, cmd_dbsize },    { "flushall", -1, cmd_flushall },
    { "info", -1, cmd_info },       { "command", -1, cmd_command },
    { "config", -2, cmd_config },   { "select", 2, cmd_select },
    { "quit", -1, cmd_quit },
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

void kv_init(void)
{
    start_ns = net_clock();
}

void kv_execute(struct client *cl, size_t argc)
{
    struct arg *argv = cl->argv;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        const struct command *c = &commands[i];
        if (!eq_nocase(&argv[0], c->name))
            continue;
        if ((c->arity > 0 && argc != (size_t)c->arity) ||
            (c->arity < 0 && argc < (size_t)-c->arity)) {
            reply_error(cl, "ERR wrong number of arguments for '%s' command", c->name);
            return;
        }
        c->fn(cl, argv, argc);
        return;
    }
    reply_unknown(cl, argv, argc);
}
