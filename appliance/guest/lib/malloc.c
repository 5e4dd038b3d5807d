/*
 * A small allocator over the heap region [heap_start, heap_end) from the boot
 * info.  Requests up to 64 KiB come from power-of-two size classes, each with
 * its own free list; larger ones are rounded to 4 KiB and kept on a first-fit
 * list that splits blocks.  Freed memory is reused but never returned or
 * coalesced: guests allocate their working set early and keep it.
 */
#include "platform.h"
#include "runtime.h"

#define ALIGN        16
#define MIN_CLASS    4          /* 16 bytes */
#define MAX_CLASS    16         /* 64 KiB */
#define PAGE         4096

struct header {                 /* 16 bytes before every block */
    size_t size;                /* usable bytes after the header */
    struct header *next;        /* free-list link while free */
};

static uintptr_t heap_base, heap_next, heap_limit;
static size_t heap_in_use;      /* bytes of blocks handed out, headers included */
static struct header *class_free[MAX_CLASS + 1];
static struct header *large_free;

void heap_init(uint64_t start, uint64_t end)
{
    heap_base = heap_next = (start + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1);
    heap_limit = end;
}

size_t plat_heap_used(void)
{
    return heap_in_use;
}

size_t plat_heap_size(void)
{
    return heap_limit - heap_base;
}

static struct header *carve(size_t size)
{
    uintptr_t need = sizeof(struct header) + size;
    if (heap_limit - heap_next < need)
        return NULL;
    struct header *h = (struct header *)heap_next;
    heap_next += need;
    h->size = size;
    return h;
}

static int size_class(size_t n)
{
    int c = MIN_CLASS;
    while (((size_t)1 << c) < n)
        c++;
    return c;
}

static struct header *alloc_large(size_t n)
{
    size_t size = (n + PAGE - 1) & ~(size_t)(PAGE - 1);
    for (struct header **link = &large_free; *link; link = &(*link)->next) {
        struct header *h = *link;
        if (h->size < size)
            continue;
        if (h->size - size >= 2 * PAGE) {       /* split: the tail stays free */
            struct header *rest = (struct header *)((char *)(h + 1) + size);
            rest->size = h->size - size - sizeof(struct header);
            rest->next = h->next;
            h->size = size;
            *link = rest;
        } else {
            *link = h->next;
        }
        return h;
    }
    return carve(size);
}

void *malloc(size_t n)
{
    if (n == 0)
        n = 1;
    if (n > heap_limit)
        return NULL;
    struct header *h;
    if (n <= ((size_t)1 << MAX_CLASS)) {
        int c = size_class(n);
        h = class_free[c];
        if (h)
            class_free[c] = h->next;
        else
            h = carve((size_t)1 << c);
    } else {
        h = alloc_large(n);
    }
    if (!h)
        return NULL;
    heap_in_use += sizeof *h + h->size;
    return h + 1;
}

void free(void *p)
{
    if (!p)
        return;
    struct header *h = (struct header *)p - 1;
    heap_in_use -= sizeof *h + h->size;
    if (h->size <= ((size_t)1 << MAX_CLASS)) {
        int c = size_class(h->size);
        h->next = class_free[c];
        class_free[c] = h;
    } else {
        h->next = large_free;
        large_free = h;
    }
}

void *calloc(size_t count, size_t size)
{
    if (size && count > (size_t)-1 / size)
        return NULL;
    void *p = malloc(count * size);
    if (p)
        memset(p, 0, count * size);
    return p;
}

void *realloc(void *p, size_t n)
{
    if (!p)
        return malloc(n);
    struct header *h = (struct header *)p - 1;
    if (n <= h->size)
        return p;
    void *q = malloc(n);
    if (q) {
        memcpy(q, p, h->size);
        free(p);
    }
    return q;
}
