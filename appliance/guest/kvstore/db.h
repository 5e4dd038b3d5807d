/* The key space: a chained hash table of binary-safe keys and values. */
#ifndef KV_DB_H
#define KV_DB_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

struct kv_entry {
    struct kv_entry *next;
    uint64_t hash;
    uint64_t expire_ns;   /* deadline on net_clock(); 0 = persistent (set via db_set_expire) */
    uint8_t *val;
    size_t vlen, klen;
    uint8_t key[];
};

typedef void (*db_visit_fn)(struct kv_entry *e, void *arg);

/* Returns the live entry for key (an expired one is deleted on the way). */
struct kv_entry *db_get(const uint8_t *key, size_t klen);
/* Sets key to a copy of val; keeps the TTL only when keep_ttl.
 * Returns the entry, or NULL when out of memory. */
struct kv_entry *db_set(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                        bool keep_ttl);
/* Appends to e's value; false (value unchanged) when out of memory. */
bool db_append(struct kv_entry *e, const uint8_t *p, size_t n);
/* Sets or (deadline 0) clears e's expiry deadline. */
void db_set_expire(struct kv_entry *e, uint64_t deadline_ns);
bool db_del(const uint8_t *key, size_t klen);
void db_flush(void);
/* Counts live keys (purging expired ones) and those with a TTL. */
size_t db_size(size_t *with_ttl);
/* Keys that carry a TTL, live or not yet reclaimed. */
size_t db_volatile(void);
/* Calls fn for every live key, in bucket order (deterministic: the hash is unseeded). */
void db_foreach(db_visit_fn fn, void *arg);
/* Visits the live keys of the bucket that cursor names and returns the next
 * cursor (0 when the scan is complete).  The cursor counts with its bits
 * reversed, as Redis's dictScan does, so a scan that spans a table growth
 * still returns every key that existed throughout it. */
uint64_t db_scan(uint64_t cursor, db_visit_fn fn, void *arg);
/* Active expiry: checks the next `buckets` buckets for expired keys,
 * round-robin over the table; returns how many were reclaimed. */
size_t db_sweep(size_t buckets);
/* Buckets in the table (the sweep's unit of work). */
size_t db_buckets(void);

#endif
