/* Hash table in guest RAM.  FNV-1a without a seed keeps bucket order, and so
 * everything the server does, identical on the COLO primary and secondary.
 * Expired keys are invisible at once and reclaimed lazily (on access) and by
 * db_sweep (kvstore's periodic active expiry). */
#include "platform.h"
#include "db.h"
#include "net.h"

static struct kv_entry **buckets;
static size_t nbuckets, count, volatile_count, sweep_pos;

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
    volatile_count -= e->expire_ns != 0;
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
        db_set_expire(e, 0);
    return e;
}

bool db_append(struct kv_entry *e, const uint8_t *p, size_t n)
{
    uint8_t *v = realloc(e->val, e->vlen + n ? e->vlen + n : 1);
    if (!v)
        return false;
    memcpy(v + e->vlen, p, n);
    e->val = v;
    e->vlen += n;
    return true;
}

void db_set_expire(struct kv_entry *e, uint64_t deadline_ns)
{
    volatile_count += (deadline_ns != 0) - (e->expire_ns != 0);
    e->expire_ns = deadline_ns;
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

/* Reclaims the expired keys of bucket b; returns how many. */
static size_t purge_bucket(size_t b, uint64_t now)
{
    size_t n = 0;
    struct kv_entry **pp = &buckets[b];
    while (*pp) {
        if (expired(*pp, now)) {
            unlink_free(pp);
            n++;
        } else {
            pp = &(*pp)->next;
        }
    }
    return n;
}

size_t db_size(size_t *with_ttl)
{
    uint64_t now = net_clock();
    for (size_t i = 0; i < nbuckets && volatile_count; i++)
        purge_bucket(i, now);
    if (with_ttl)
        *with_ttl = volatile_count;
    return count;
}

size_t db_volatile(void)
{
    return volatile_count;
}

size_t db_buckets(void)
{
    return nbuckets;
}

void db_foreach(db_visit_fn fn, void *arg)
{
    uint64_t now = net_clock();
    for (size_t i = 0; i < nbuckets; i++) {
        purge_bucket(i, now);
        for (struct kv_entry *e = buckets[i]; e; e = e->next)
            fn(e, arg);
    }
}

static uint64_t reverse_bits(uint64_t v)
{
    uint64_t r = 0;
    for (int i = 0; i < 64; i++, v >>= 1)
        r = (r << 1) | (v & 1);
    return r;
}

uint64_t db_scan(uint64_t cursor, db_visit_fn fn, void *arg)
{
    if (!nbuckets)
        return 0;
    uint64_t mask = nbuckets - 1;
    size_t b = (size_t)(cursor & mask);
    purge_bucket(b, net_clock());
    for (struct kv_entry *e = buckets[b]; e; e = e->next)
        fn(e, arg);
    /* Increment the reversed cursor: set the bits above the mask so the
     * carry runs off the top once every bucket was visited. */
    cursor |= ~mask;
    return reverse_bits(reverse_bits(cursor) + 1);
}

size_t db_sweep(size_t nb)
{
    uint64_t now = net_clock();
    size_t reclaimed = 0;
    for (size_t i = 0; i < nb && volatile_count && nbuckets; i++) {
        sweep_pos = (sweep_pos + 1) & (nbuckets - 1);
        reclaimed += purge_bucket(sweep_pos, now);
    }
    return reclaimed;
}
