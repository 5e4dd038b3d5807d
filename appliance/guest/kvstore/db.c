/* Hash table in guest RAM.  FNV-1a without a seed keeps bucket order, and so
 * everything the server does, identical on the COLO primary and secondary. */
#include "platform.h"
#include "db.h"
#include "net.h"

static struct kv_entry **buckets;
static size_t nbuckets, count;

static uint64_t hash_key(const uint8_t *k, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= k[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static void grow(void)
{
    size_t n = nbuckets ? nbuckets * 2 : 1024;
    struct kv_entry **nb = calloc(n, sizeof *nb);
    if (!nb)
        return; /* keep the old table: longer chains, still correct */
    for (size_t i = 0; i < nbuckets; i++) {
        struct kv_entry *e = buckets[i], *next;
        for (; e; e = next) {
            next = e->next;
            size_t b = e->hash & (n - 1);
            e->next = nb[b];
            nb[b] = e;
        }
    }
    free(buckets);
    buckets = nb;
    nbuckets = n;
}

static bool expired(const struct kv_entry *e, uint64_t now)
{
    return e->expire_ns && now >= e->expire_ns;
}

static void unlink_free(struct kv_entry **pp)
{
    struct kv_entry *e = *pp;
    *pp = e->next;
    free(e->val);
    free(e);
    count--;
}

/* Pointer to the link that holds key, or to the chain's terminating NULL. */
static struct kv_entry **find(const uint8_t *key, size_t klen, uint64_t h)
{
    if (!nbuckets)
        return NULL;
    struct kv_entry **pp = &buckets[h & (nbuckets - 1)];
    for (; *pp; pp = &(*pp)->next)
        if ((*pp)->hash == h && (*pp)->klen == klen && memcmp((*pp)->key, key, klen) == 0)
            break;
    return pp;
}

struct kv_entry *db_get(const uint8_t *key, size_t klen)
{
    struct kv_entry **pp = find(key, klen, hash_key(key, klen));
    if (!pp || !*pp)
        return NULL;
    if (expired(*pp, net_clock())) {
        unlink_free(pp);
        return NULL;
    }
    return *pp;
}

struct kv_entry *db_set(const uint8_t *key, size_t klen, const uint8_t *val, size_t vlen,
                        bool keep_ttl)
{
    uint64_t h = hash_key(key, klen);
    uint8_t *v = malloc(vlen ? vlen : 1);
    if (!v)
        return NULL;
    memcpy(v, val, vlen);
    struct kv_entry **pp = find(key, klen, h);
    struct kv_entry *e = pp ? *pp : NULL;
    if (e && expired(e, net_clock())) {
        unlink_free(pp);
        e = NULL;
    }
    if (e) {
        free(e->val);
    } else {
        if (count >= nbuckets)
            grow();
        if (!nbuckets || !(e = malloc(sizeof *e + klen))) {
            free(v);
            return NULL;
        }
        e->hash = h;
        e->klen = klen;
        e->expire_ns = 0;
        memcpy(e->key, key, klen);
        size_t b = h & (nbuckets - 1);
        e->next = buckets[b];
        buckets[b] = e;
        count++;
    }
    e->val = v;
    e->vlen = vlen;
    if (!keep_ttl)
        e->expire_ns = 0;
    return e;
}

bool db_del(const uint8_t *key, size_t klen)
{
    struct kv_entry **pp = find(key, klen, hash_key(key, klen));
    if (!pp || !*pp)
        return false;
    bool live = !expired(*pp, net_clock());
    unlink_free(pp);
    return live;
}

void db_flush(void)
{
    for (size_t i = 0; i < nbuckets; i++)
        while (buckets[i])
            unlink_free(&buckets[i]);
}

size_t db_size(size_t *with_ttl)
{
    uint64_t now = net_clock();
    size_t ttl = 0;
    for (size_t i = 0; i < nbuckets; i++) {
        struct kv_entry **pp = &buckets[i];
        while (*pp) {
            if (expired(*pp, now)) {
                unlink_free(pp);
                continue;
            }
            ttl += (*pp)->expire_ns != 0;
            pp = &(*pp)->next;
        }
    }
    if (with_ttl)
        *with_ttl = ttl;
    return count;
}
