/* RESP2 encoding of replies and parsing of multibulk and inline requests. */
#include <stdarg.h>
#include "kvstore.h"

void buf_append(struct buf *b, const void *p, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *np = realloc(b->p, cap);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

size_t fmt_ll(char *buf, long long v)
{
    char tmp[24];
    size_t n = 0, len = 0;
    unsigned long long u = v < 0 ? 0 - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        buf[len++] = '-';
    while (n)
        buf[len++] = tmp[--n];
    buf[len] = 0;
    return len;
}

bool parse_ll(const uint8_t *p, size_t n, long long *out)
{
    if (n == 0 || n > 20)
        return false;
    size_t i = 0;
    bool neg = false;
    if (p[0] == '-') {
        neg = true;
        if (++i == n)
            return false;
    }
    if (p[i] == '0')
        return n == 1 ? (*out = 0, true) : false; /* "0" only; "-0", "01" rejected */
    unsigned long long v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return false;
        unsigned d = (unsigned)(p[i] - '0');
        if (v > (~0ull - d) / 10)
            return false;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > (1ull << 63))
            return false;
        *out = (long long)(0 - v);
    } else {
        if (v > (1ull << 63) - 1)
            return false;
        *out = (long long)v;
    }
    return true;
}

static void out_line(struct client *cl, char type, long long v)
{
    char line[32];
    line[0] = type;
    size_t n = 1 + fmt_ll(line + 1, v);
    line[n++] = '\r';
    line[n++] = '\n';
    buf_append(&cl->out, line, n);
}

void reply_raw(struct client *cl, const char *s)
{
    buf_append(&cl->out, s, strlen(s));
}

void reply_status(struct client *cl, const char *s)
{
    buf_append(&cl->out, "+", 1);
    buf_append(&cl->out, s, strlen(s));
    buf_append(&cl->out, "\r\n", 2);
}

void reply_error(struct client *cl, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    size_t n = fmt_vsn(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n >= sizeof msg)
        n = sizeof msg - 1;
    /* An error reply is one line: Redis turns CR and LF into spaces. */
    for (size_t i = 0; i < n; i++)
        if (msg[i] == '\r' || msg[i] == '\n')
            msg[i] = ' ';
    buf_append(&cl->out, "-", 1);
    buf_append(&cl->out, msg, n);
    buf_append(&cl->out, "\r\n", 2);
}

void reply_int(struct client *cl, long long v)
{
    out_line(cl, ':', v);
}

void reply_bulk(struct client *cl, const void *p, size_t n)
{
    out_line(cl, '$', (long long)n);
    buf_append(&cl->out, p, n);
    buf_append(&cl->out, "\r\n", 2);
}

void reply_nil(struct client *cl)
{
    reply_raw(cl, "$-1\r\n");
}

void reply_array(struct client *cl, size_t n)
{
    out_line(cl, '*', (long long)n);
}

static bool push_arg(struct client *cl, size_t i, const uint8_t *p, size_t n)
{
    if (i >= cl->argv_cap) {
        size_t cap = cl->argv_cap ? cl->argv_cap * 2 : 16;
        struct arg *a = realloc(cl->argv, cap * sizeof *a);
        if (!a)
            return false;
        cl->argv = a;
        cl->argv_cap = cap;
    }
    cl->argv[i] = (struct arg){ p, n };
    return true;
}

/* Finds "\r\n" in [p, p+n); returns the line length or -1. */
static long find_crlf(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n')
            return (long)i;
    return -1;
}

static long protocol_error(struct client *cl, const char *what)
{
    reply_error(cl, "ERR Protocol error: %s", what);
    cl->close_after = true;
    return -1;
}

static long parse_inline(struct client *cl, const uint8_t *p, size_t n, size_t *used)
{
    size_t end = 0;
    while (end < n && p[end] != '\n')
        end++;
    if (end == n) {
        if (n > KV_MAX_INLINE)
            return protocol_error(cl, "too big inline request");
        return 0;
    }
    *used = end + 1;
    size_t line = end > 0 && p[end - 1] == '\r' ? end - 1 : end;
    size_t argc = 0;
    for (size_t i = 0; i < line;) {
        while (i < line && (p[i] == ' ' || p[i] == '\t'))
            i++;
        size_t s = i;
        while (i < line && p[i] != ' ' && p[i] != '\t')
            i++;
        if (i > s && !push_arg(cl, argc++, p + s, i - s))
            return protocol_error(cl, "out of memory");
    }
    return (long)argc;
}

long resp_parse(struct client *cl, size_t *used)
{
    const uint8_t *p = cl->in.p + cl->in_off;
    size_t n = cl->in.len - cl->in_off;
    *used = 0;
    if (n == 0)
        return 0;
    if (p[0] != '*')
        return parse_inline(cl, p, n, used);

    long ll = find_crlf(p, n);
    if (ll < 0)
        return n > KV_MAX_INLINE ? protocol_error(cl, "too big mbulk count string") : 0;
    long long count;
    if (!parse_ll(p + 1, (size_t)ll - 1, &count) || count > (long long)KV_MAX_ARGS)
        return protocol_error(cl, "invalid multibulk length");
    size_t pos = (size_t)ll + 2;
    if (count <= 0) {
        *used = pos;
        return 0;
    }
    for (size_t i = 0; i < (size_t)count; i++) {
        if (pos >= n)
            return 0;
        if (p[pos] != '$') {
            char got[2] = { (char)p[pos], 0 };
            reply_error(cl, "ERR Protocol error: expected '$', got '%s'", got);
            cl->close_after = true;
            return -1;
        }
        ll = find_crlf(p + pos, n - pos);
        if (ll < 0)
            return n - pos > KV_MAX_INLINE ? protocol_error(cl, "too big bulk count string") : 0;
        long long blen;
        if (!parse_ll(p + pos + 1, (size_t)ll - 1, &blen) || blen < 0 ||
            blen > (long long)KV_MAX_BULK)
            return protocol_error(cl, "invalid bulk length");
        pos += (size_t)ll + 2;
        if (n - pos < (size_t)blen + 2)
            return 0;
        if (p[pos + blen] != '\r' || p[pos + blen + 1] != '\n')
            return protocol_error(cl, "bulk string not terminated by CRLF");
        if (!push_arg(cl, i, p + pos, (size_t)blen))
            return protocol_error(cl, "out of memory");
        pos += (size_t)blen + 2;
    }
    *used = pos;
    return (long)count;
}
