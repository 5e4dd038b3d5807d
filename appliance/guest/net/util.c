/* Checksums, command-line parsing and a minimal formatter (no libc here). */
#include "netif.h"

uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t len)
{
    while (len > 1) {
        sum += get16(p);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

uint16_t csum_fold(uint32_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

uint32_t csum_pseudo(uint32_t src, uint32_t dst, uint8_t proto, size_t len)
{
    return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + (uint32_t)len;
}

int cmdline_get(const char *s, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key);
    while (s && *s) {
        while (*s == ' ' || *s == '\t')
            s++;
        const char *tok = s;
        while (*s && *s != ' ' && *s != '\t')
            s++;
        if ((size_t)(s - tok) > klen && memcmp(tok, key, klen) == 0 && tok[klen] == '=') {
            size_t vlen = (size_t)(s - tok) - klen - 1;
            if (vlen + 1 > cap)
                return -1;
            memcpy(out, tok + klen + 1, vlen);
            out[vlen] = 0;
            return (int)vlen;
        }
    }
    return -1;
}

const char *parse_ipv4(const char *s, uint32_t *ip)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        if (i && *s++ != '.')
            return NULL;
        if (*s < '0' || *s > '9')
            return NULL;
        unsigned octet = 0;
        for (int d = 0; *s >= '0' && *s <= '9'; d++, s++) {
            if (d == 3)
                return NULL;
            octet = octet * 10 + (unsigned)(*s - '0');
        }
        if (octet > 255)
            return NULL;
        v = v << 8 | octet;
    }
    *ip = v;
    return s;
}

/* ---- formatter ---- */

struct out {
    char *buf;
    size_t cap, len;
};

static void put_c(struct out *o, char c)
{
    if (o->len + 1 < o->cap)
        o->buf[o->len] = c;
    o->len++;
}

static void put_s(struct out *o, const char *s)
{
    while (*s)
        put_c(o, *s++);
}

static void put_u(struct out *o, unsigned long long v, unsigned base, int width)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    for (; width > n; width--)
        put_c(o, '0');
    while (n)
        put_c(o, tmp[--n]);
}

size_t fmt_vsn(char *buf, size_t cap, const char *fmt, va_list ap)
{
    struct out o = { buf, cap, 0 };
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put_c(&o, *fmt);
            continue;
        }
        fmt++;
        int width = 0;
        if (*fmt == '0')
            for (fmt++; *fmt >= '0' && *fmt <= '9'; fmt++)
                width = width * 10 + (*fmt - '0');
        int lng = 0;
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        if (*fmt == 'z') {
            lng = 2;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            put_s(&o, s ? s : "(null)");
            break;
        }
        case 'c':
            put_c(&o, (char)va_arg(ap, int));
            break;
        case 'd': {
            long long v = lng ? va_arg(ap, long long) : va_arg(ap, int);
            if (lng == 1)
                v = (long)v;
            unsigned long long u = (unsigned long long)v;
            if (v < 0) {
                put_c(&o, '-');
                u = 0 - u;
            }
            put_u(&o, u, 10, width);
            break;
        }
        case 'u':
        case 'x': {
            unsigned long long v = lng ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
            put_u(&o, v, *fmt == 'u' ? 10 : 16, width);
            break;
        }
        case 'I': {
            uint32_t ip = va_arg(ap, uint32_t);
            for (int i = 3; i >= 0; i--) {
                put_u(&o, (ip >> (i * 8)) & 0xff, 10, 0);
                if (i)
                    put_c(&o, '.');
            }
            break;
        }
        case '%':
            put_c(&o, '%');
            break;
        default:
            goto done; /* unknown conversion: stop rather than misread args */
        }
        if (!*fmt)
            break;
    }
done:
    if (cap)
        buf[o.len < cap ? o.len : cap - 1] = 0;
    return o.len;
}

size_t fmt_sn(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    size_t n = fmt_vsn(buf, cap, fmt, ap);
    va_end(ap);
    return n;
}

void net_log(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    size_t n = fmt_vsn(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    plat_console_write(line, n);
}
