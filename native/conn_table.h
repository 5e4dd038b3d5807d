/*
 * The connection table of the comparer (colo_compare.c) and the rewriter (colo_rewrite.c):
 * a chained hash table whose entries live inside their owner's struct (a conn_link as its
 * first member), keyed by what the owner says.  Header-only, like packet.h.
 *
 *   buckets[hash & (n - 1)] ──► link ──► link ──► NULL      n a power of two, doubled when
 *                                                            entries outnumber buckets
 *
 * Each link keeps its hash, so growing needs no key.  The hash is seeded per table: the
 * keys are the ends of the clients' connections, and without a seed a client choosing its
 * ports could put them all in one chain.
 */
#ifndef COLO_CONN_TABLE_H
#define COLO_CONN_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

enum { CT_FIRST_BUCKETS = 64 };

typedef struct conn_link {
    struct conn_link *chain;    /* the next in its bucket */
    uint64_t hash;
} conn_link;

typedef struct {
    conn_link **buckets;
    size_t n_buckets, count;
    uint64_t seed;
} conn_table;

/* splitmix64's finaliser: every input bit reaches every output bit. */
static inline uint64_t ct_mix64(uint64_t h)
{
    h ^= h >> 30;
    h *= 0xBF58476D1CE4E5B9ULL;
    h ^= h >> 27;
    h *= 0x94D049BB133111EBULL;
    return h ^ (h >> 31);
}

/* 0, or -1 on no memory. */
static inline int ct_init(conn_table *t)
{
    t->buckets = calloc(CT_FIRST_BUCKETS, sizeof *t->buckets);
    if (!t->buckets)
        return -1;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t->n_buckets = CT_FIRST_BUCKETS;
    t->count = 0;
    t->seed = ct_mix64((uint64_t)(uintptr_t)t ^ (uint64_t)ts.tv_nsec << 20 ^ (uint64_t)ts.tv_sec);
    return 0;
}

/* A key of two words (the owner packs its ends and the rest into them). */
static inline uint64_t ct_hash(const conn_table *t, uint64_t a, uint64_t b)
{
    return ct_mix64(ct_mix64(a ^ t->seed) ^ b);
}

/* The link pointing at the first entry with this hash that same(entry, key) accepts, or at
 * the NULL ending its chain: the place to read, unlink or insert. */
static inline conn_link **ct_find(conn_table *t, uint64_t hash, int (*same)(const conn_link *, const void *),
                                  const void *key)
{
    conn_link **link = &t->buckets[hash & (t->n_buckets - 1)];
    while (*link && !((*link)->hash == hash && same(*link, key)))
        link = &(*link)->chain;
    return link;
}

/* Doubles the buckets; on no memory the old ones stay (chains just get longer). */
static inline void ct_grow(conn_table *t)
{
    size_t n = t->n_buckets * 2;
    conn_link **buckets = calloc(n, sizeof *buckets);
    if (!buckets)
        return;
    for (size_t i = 0; i < t->n_buckets; i++) {
        for (conn_link *e = t->buckets[i], *next; e; e = next) {
            next = e->chain;
            e->chain = buckets[e->hash & (n - 1)];
            buckets[e->hash & (n - 1)] = e;
        }
    }
    free(t->buckets);
    t->buckets = buckets;
    t->n_buckets = n;
}

static inline void ct_insert(conn_table *t, conn_link *e, uint64_t hash)
{
    conn_link **head = &t->buckets[hash & (t->n_buckets - 1)];
    e->hash = hash;
    e->chain = *head;
    *head = e;
    if (++t->count > t->n_buckets)
        ct_grow(t);
}

/* Takes the entry *link points at out of the table (the owner frees it). */
static inline void ct_unlink(conn_table *t, conn_link **link)
{
    *link = (*link)->chain;
    t->count--;
}

/* Frees every entry with free() (each is its owner's struct, the link first) and empties the table. */
static inline void ct_clear(conn_table *t)
{
    for (size_t i = 0; i < t->n_buckets; i++) {
        for (conn_link *e = t->buckets[i], *next; e; e = next) {
            next = e->chain;
            free(e);
        }
        t->buckets[i] = NULL;
    }
    t->count = 0;
}

#endif
