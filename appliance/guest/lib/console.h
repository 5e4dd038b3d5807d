/* printf-style console output for unikernel guests (not part of platform.h). */
#ifndef GUEST_CONSOLE_H
#define GUEST_CONSOLE_H

/* Supports %s %c %d %u %x %p and the l/ll/z length modifiers; no widths. */
void console_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
