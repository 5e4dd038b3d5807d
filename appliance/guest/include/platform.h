/*
 * The contract between guest programs (kvstore, memdirty, the TCP/IP stack)
 * and the runtime beneath them.  Two runtimes implement it:
 *   - lib/      : the unikernel runtime, on hypercalls to our VMM (docs/guest-abi.md)
 *   - hosted/   : a Linux process on a tap device, used to test the stack on the host
 * Guest code includes only this header and <stddef.h>/<stdint.h>/<stdbool.h>/<stdarg.h>;
 * both runtimes also provide memcpy, memmove, memset, memcmp, strlen, malloc,
 * calloc, realloc and free with their standard meanings.
 */
#ifndef PLATFORM_H
#define PLATFORM_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
void *malloc(size_t n);
void *calloc(size_t count, size_t size);
void *realloc(void *p, size_t n);
void free(void *p);

/* The heap behind malloc: bytes in blocks handed out now (with their
 * headers), and the heap's whole size (0 when the runtime has no fixed
 * heap).  kvstore's INFO memory and its maxmemory limit read them. */
size_t plat_heap_used(void);
size_t plat_heap_size(void);

/* Time in nanoseconds: monotonic (never goes back, continuous across a
 * save/restore or migration) and wall clock (Unix epoch). */
uint64_t plat_now_ns(void);
uint64_t plat_wall_ns(void);

/* Console output (the VMM writes it to the console log). */
void plat_console_write(const char *s, size_t n);

/* Block until the NIC may have a frame to read or `deadline_ns` (monotonic)
 * passes.  Returns true when the NIC is ready.  An idle guest costs no CPU. */
bool plat_poll(uint64_t deadline_ns);

/* One whole Ethernet frame (no FCS).  read returns its length, or 0 when no
 * frame is queued; write returns 0 on success, -1 when it was dropped. */
size_t plat_net_read(void *frame, size_t cap);
int plat_net_write(const void *frame, size_t len);

/* The NIC's MAC address, from the boot info. */
void plat_net_mac(uint8_t mac[6]);

/* Sectors of 512 bytes on the block device; 0 on success, -1 on error.
 * plat_block_sectors returns 0 when there is no disk. */
uint64_t plat_block_sectors(void);
int plat_block_read(uint64_t sector, void *buf, size_t count);
int plat_block_write(uint64_t sector, const void *buf, size_t count);

/* The guest's command line: "key=value key=value ...". */
const char *plat_cmdline(void);

/* Stop the guest with an exit status. */
void plat_halt(int status) __attribute__((noreturn));

/* The program's entry point, called by the runtime. */
int guest_main(void);

#endif
