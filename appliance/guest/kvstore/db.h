/* The key space: a chained hash table of binary-safe keys and values. */
#ifndef KV_DB_H
#define KV_DB_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

struct kv_entry {
    struct kv_entry *next;
    uint64_t hash;
    uint64_t expire_ns;   /* monotonic deadline; 0 = persistent */
    uint8_t *val;
    size_t vlen, klen;
    uint8_t key[];
};

/* Returns the live entry for key (expired ones are deleted on the way). */
struct kv_entry *db_get(const uint8_t *key, size_t klen);
/* Sets key to a copy of val; keeps the TTL only when keep_ttl.
 * Returns the entry, or NULL when out of memory. */
struct kv_entry *db_set(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                        bool keep_ttl);
bool db_del(const uint8_t *key, size_t klen);
void db_flush(void);
/* Counts live keys (purging expired ones) and those with a TTL. */
size_t db_size(size_t *with_ttl);

#endif
