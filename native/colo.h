/*
 * The COLO network layer's per-frame logic in C: the comparer (netfilter/compare.py) and
 * the rewriter (netfilter/rewriter.py), with exactly their Python twins' behaviour, so
 * the datapath loops (native/colo_path.c) can run them without the GIL.  Each is pure
 * logic: no threads, no I/O, no Python objects; one thread at a time uses an instance.
 * Times are seconds on the monotonic clock, passed in by the caller.
 */
#ifndef COLO_H
#define COLO_H

#include <stddef.h>
#include <stdint.h>

#include "packet.h"

/* Each file registers its Python type in the module (called from PyInit__native):
 * native.Comparer and native.Rewriter, with the Python classes' API. */
#include <Python.h>
int colo_compare_register(PyObject *module);
int colo_rewrite_register(PyObject *module);
int colo_path_register(PyObject *module);           /* native/colo_path.c: ColoPrimary, ColoSecondary */

/* --- comparer (native/colo_compare.c) ------------------------------------------------ */

/* Per flow class (enum pkt_flow), as netfilter.compare.COUNTERS orders them. */
enum cmp_counter { CMP_PRIMARY, CMP_SECONDARY, CMP_RELEASED, CMP_MATCHED, CMP_MISMATCHES,
                   CMP_TIMEOUTS, CMP_DROPPED, CMP_MALFORMED, CMP_COUNTERS };

typedef struct cmp_passthrough {
    unsigned protocol;      /* 6 or 17 */
    unsigned port;
} cmp_passthrough;

/* release(ctx, frame, len): a primary frame goes out (the callee copies it if it keeps it).
 * request_checkpoint(ctx, reason): reason is "mismatch", as in Python. */
typedef void (*cmp_release_fn)(void *ctx, const uint8_t *frame, size_t len);
typedef void (*cmp_checkpoint_fn)(void *ctx, const char *reason);

typedef struct comparer comparer;

/* NULL on a bad argument (timeout or queue size not positive, a protocol not 6/17) or no memory. */
comparer *cmp_new(unsigned compare_timeout_ms, unsigned max_queue_size,
                  const cmp_passthrough *passthrough, size_t n_passthrough,
                  cmp_release_fn release, cmp_checkpoint_fn request_checkpoint, void *ctx);
void cmp_free(comparer *c);
void cmp_primary(comparer *c, const uint8_t *frame, size_t len, double now);
void cmp_secondary(comparer *c, const uint8_t *frame, size_t len, double now);
int cmp_scan_expired(comparer *c, double now);    /* 1 when it asked for a checkpoint */
void cmp_checkpoint(comparer *c);
void cmp_failover(comparer *c);
int cmp_failed_over(const comparer *c);
size_t cmp_held(const comparer *c);                /* primary frames held now */
const uint64_t (*cmp_counters(const comparer *c))[CMP_COUNTERS];   /* [PKT_FLOWS][CMP_COUNTERS] */
/* Passthrough rules as the Python comparer takes them, ((protocol, port), ...) with "tcp" or
 * "udp" in any case (ports that are not ints of 0..65535 never match, as in Python): a
 * PyMem_Malloc'd list of *n rules and, in *set, the rules as a set of (protocol, port); NULL
 * with ValueError or TypeError set.  Needs the GIL. */
cmp_passthrough *cmp_passthrough_parse(PyObject *passthrough, PyObject **set, Py_ssize_t *n);
/* Counters as Python sees them: {flow class: {counter: n}} (needs the GIL). */
PyObject *cmp_counters_dict(const uint64_t counts[PKT_FLOWS][CMP_COUNTERS]);

/* --- rewriter (native/colo_rewrite.c) ------------------------------------------------ */

enum rw_counter { RW_TO_GUEST, RW_FROM_GUEST, RW_LEARNED, RW_MALFORMED, RW_COUNTERS };

typedef struct rewriter rewriter;

rewriter *rw_new(double idle_timeout_s, double close_linger_s);
void rw_free(rewriter *r);
/* Rewrite in place (len never changes); 1 if the frame was rewritten, else 0. */
int rw_to_guest(rewriter *r, uint8_t *frame, size_t len, double now);
int rw_from_guest(rewriter *r, uint8_t *frame, size_t len, double now);
size_t rw_scan_expired(rewriter *r, double now);
void rw_checkpoint(rewriter *r);
void rw_failover(rewriter *r);
int rw_failed_over(const rewriter *r);
size_t rw_connections(const rewriter *r);
const uint64_t *rw_counters(const rewriter *r);    /* [RW_COUNTERS] */
/* The learned offset of a TCP connection (either direction's addresses and ports, host
 * order): 1 and *offset, or 0 when untracked or not learned yet (Rewriter.offset(key)). */
int rw_offset(rewriter *r, uint32_t ip_a, unsigned port_a, uint32_t ip_b, unsigned port_b,
              uint32_t *offset);
/* The rewriter inside a native.Rewriter object (borrowed: it lives as long as the object),
 * so a datapath loop works on the state the Python side reads; NULL and TypeError for any
 * other object.  Needs the GIL; the caller keeps Python's calls and its own apart. */
rewriter *colo_rewriter_of(PyObject *object);

#endif
