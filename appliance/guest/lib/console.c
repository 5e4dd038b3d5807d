#include <stdarg.h>
#include "platform.h"
#include "console.h"

struct out {
    char buf[256];
    size_t len;
};

static void put(struct out *o, char c)
{
    if (o->len == sizeof o->buf) {
        plat_console_write(o->buf, o->len);
        o->len = 0;
    }
    o->buf[o->len++] = c;
}

static void put_unsigned(struct out *o, unsigned long long v, unsigned base)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        put(o, digits[--n]);
}

void console_printf(const char *fmt, ...)
{
    struct out o = { .len = 0 };
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        int longs = 0;
        while (fmt[1] == 'l' || fmt[1] == 'z') {
            longs++;
            fmt++;
        }
        switch (*++fmt) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                put(&o, *s);
            break;
        case 'c':
            put(&o, (char)va_arg(ap, int));
            break;
        case 'd': {
            long long v = longs ? va_arg(ap, long long) : va_arg(ap, int);
            if (v < 0) {
                put(&o, '-');
                put_unsigned(&o, -(unsigned long long)v, 10);
            } else {
                put_unsigned(&o, (unsigned long long)v, 10);
            }
            break;
        }
        case 'u':
        case 'x': {
            unsigned long long v = longs ? va_arg(ap, unsigned long long) : va_arg(ap, unsigned);
            put_unsigned(&o, v, *fmt == 'u' ? 10 : 16);
            break;
        }
        case 'p':
            put(&o, '0');
            put(&o, 'x');
            put_unsigned(&o, (uintptr_t)va_arg(ap, void *), 16);
            break;
        case '%':
            put(&o, '%');
            break;
        default:                /* unknown conversion: print it as is */
            put(&o, '%');
            if (!*fmt)
                fmt--;
            else
                put(&o, *fmt);
        }
    }
    va_end(ap);
    if (o.len)
        plat_console_write(o.buf, o.len);
}
