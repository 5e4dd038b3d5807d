/*
 * The COLO TCP rewriter in C: the twin of netfilter/rewriter.py (its docstring has the
 * rules: how the ISN offset is learned, what each direction rewrites, when a connection
 * is forgotten).  Two layers:
 *
 *   rw_*()            pure C, no Python objects, no GIL: the datapath loop
 *                     (native/colo_path.c) calls these with the time it read itself;
 *   native.Rewriter   a Python type around them with netfilter.rewriter.PyRewriter's API,
 *                     for the Python-wired path and the tests (both tested against it).
 *
 * Connections live in a conn_table.h table keyed by their two (address, port) ends, sorted
 * so both directions find the same entry (Packet.key for TCP).  A frame costs one parse,
 * one lookup and, when rewritten, one checksum pass; only scan_expired walks the table.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "colo.h"
#include "conn_table.h"

enum { TCP_OPTION_END = 0, TCP_OPTION_NOP = 1, TCP_OPTION_SACK = 5 };

/* A connection the SVM opened (or accepted) since the last checkpoint. */
typedef struct connection {
    conn_link link;                 /* in the table (first: conn_table.h) */
    uint32_t ip_lo, ip_hi;          /* the two ends, the lower (ip, port) first */
    unsigned port_lo, port_hi;
    uint32_t svm_isn;
    int learned;                    /* offset known (Python: offset is not None) */
    uint32_t offset;                /* pvm - svm once learned, else 0 */
    int guest_fin, peer_fin;
    int closed;                     /* closed_at is set */
    double closed_at, last_seen;
} connection;

struct rewriter {
    double idle_timeout, close_linger;
    conn_table table;
    int failed_over;
    uint64_t counters[RW_COUNTERS];
};

/* The connection's ends in canonical order (either direction gives the same). */
typedef struct {
    uint32_t ip_lo, ip_hi;
    unsigned port_lo, port_hi;
} ends;

static ends ends_of(uint32_t ip_a, unsigned port_a, uint32_t ip_b, unsigned port_b)
{
    if (ip_a < ip_b || (ip_a == ip_b && port_a <= port_b))
        return (ends){ip_a, ip_b, port_a, port_b};
    return (ends){ip_b, ip_a, port_b, port_a};
}

static uint64_t hash_of(const rewriter *r, const ends *e)
{
    return ct_hash(&r->table, (uint64_t)e->ip_lo << 32 | e->ip_hi, (uint64_t)e->port_lo << 16 | e->port_hi);
}

static int same_ends(const conn_link *link, const void *key)
{
    const connection *c = (const connection *)link;
    const ends *e = key;
    return c->ip_lo == e->ip_lo && c->ip_hi == e->ip_hi && c->port_lo == e->port_lo && c->port_hi == e->port_hi;
}

static connection *find(rewriter *r, const ends *e)
{
    return (connection *)*ct_find(&r->table, hash_of(r, e), same_ends, e);
}

rewriter *rw_new(double idle_timeout_s, double close_linger_s)
{
    rewriter *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    if (ct_init(&r->table) < 0) {
        free(r);
        return NULL;
    }
    r->idle_timeout = idle_timeout_s;
    r->close_linger = close_linger_s;
    return r;
}

void rw_checkpoint(rewriter *r)
{
    ct_clear(&r->table);
}

void rw_free(rewriter *r)
{
    if (!r)
        return;
    ct_clear(&r->table);
    free(r->table.buckets);
    free(r);
}

/* Parses a frame; 1 for a TCP segment (fragments are not), 0 for anything else.  Every frame
 * the parser rejects counts as malformed, whatever its protocol (as in Python). */
static int parse_tcp(rewriter *r, const uint8_t *frame, size_t len, pkt_info *k)
{
    if (pkt_parse(frame, len, k) < 0) {
        r->counters[RW_MALFORMED]++;
        return 0;
    }
    return k->flow == PKT_TCP;
}

static void note_close(connection *c, int rst, double now)
{
    if (!c->closed && (rst || (c->guest_fin && c->peer_fin))) {
        c->closed = 1;
        c->closed_at = now;
    }
}

/* Subtracts delta from both edges of every whole SACK block (RFC 2018) in the TCP options
 * at t; stops at the end-of-options or at a malformed option (the rest stays as it is). */
static void shift_sack_blocks(uint8_t *t, size_t header_length, uint32_t delta)
{
    size_t i = 20, end = header_length;
    while (i < end && t[i] != TCP_OPTION_END) {
        if (t[i] == TCP_OPTION_NOP) {
            i++;
            continue;
        }
        size_t length = i + 1 < end ? t[i + 1] : 0;
        if (length < 2 || i + length > end)
            return;
        if (t[i] == TCP_OPTION_SACK)
            for (size_t block = i + 2; block + 8 <= i + length; block += 8) {
                pkt_put_be32(t + block, pkt_be32(t + block) - delta);
                pkt_put_be32(t + block + 4, pkt_be32(t + block + 4) - delta);
            }
        i += length;
    }
}

/* A peer's frame for the SVM: ack (and SACK blocks) -= offset. */
int rw_to_guest(rewriter *r, uint8_t *frame, size_t len, double now)
{
    pkt_info k;
    if (!parse_tcp(r, frame, len, &k))
        return 0;
    ends e = ends_of(k.src, k.sport, k.dst, k.dport);
    connection *c = find(r, &e);
    if (!c)
        return 0;
    c->last_seen = now;
    if (!c->learned && (k.tcp_flags & PKT_ACK)) {
        c->offset = k.ack - 1 - c->svm_isn;
        c->learned = 1;
        r->counters[RW_LEARNED]++;
    }
    c->peer_fin |= (k.tcp_flags & PKT_FIN) != 0;
    note_close(c, (k.tcp_flags & PKT_RST) != 0, now);
    if (!c->offset)                 /* unknown or 0: nothing to move */
        return 0;
    uint8_t *t = frame + k.transport;
    if (k.tcp_flags & PKT_ACK)
        pkt_put_be32(t + 8, k.ack - c->offset);
    shift_sack_blocks(t, k.header_length, c->offset);
    pkt_fill_tcp_checksum(frame, &k);
    r->counters[RW_TO_GUEST]++;
    return 1;
}

/* An SVM frame for the comparer (or, after failover, the peer): seq += offset.  A SYN
 * with a new ISN starts tracking its connection afresh (before failover) or ends it. */
int rw_from_guest(rewriter *r, uint8_t *frame, size_t len, double now)
{
    pkt_info k;
    if (!parse_tcp(r, frame, len, &k))
        return 0;
    ends e = ends_of(k.src, k.sport, k.dst, k.dport);
    uint64_t hash = hash_of(r, &e);
    conn_link **link = ct_find(&r->table, hash, same_ends, &e);
    connection *c = (connection *)*link;
    if ((k.tcp_flags & PKT_SYN) && (!c || c->svm_isn != k.seq)) {
        if (r->failed_over) {       /* a new connection: not ours to rewrite */
            if (c) {
                ct_unlink(&r->table, link);
                free(c);
            }
            return 0;
        }
        int fresh = !c;
        if (fresh && !(c = malloc(sizeof *c)))
            return 0;               /* no memory: untracked, so never rewritten */
        /* Tracked from this SYN on, learned afresh (Python replaces its _Tracked). */
        *c = (connection){.link = fresh ? (conn_link){0} : c->link, .ip_lo = e.ip_lo, .ip_hi = e.ip_hi,
                          .port_lo = e.port_lo, .port_hi = e.port_hi, .svm_isn = k.seq, .last_seen = now};
        if (fresh)
            ct_insert(&r->table, &c->link, hash);
        return 0;
    }
    if (!c)
        return 0;
    c->last_seen = now;
    c->guest_fin |= (k.tcp_flags & PKT_FIN) != 0;
    note_close(c, (k.tcp_flags & PKT_RST) != 0, now);
    if (!c->offset)
        return 0;
    uint8_t *t = frame + k.transport;
    pkt_put_be32(t + 4, k.seq + c->offset);
    pkt_fill_tcp_checksum(frame, &k);
    r->counters[RW_FROM_GUEST]++;
    return 1;
}

size_t rw_scan_expired(rewriter *r, double now)
{
    size_t expired = 0;
    for (size_t i = 0; i < r->table.n_buckets; i++) {
        conn_link **link = &r->table.buckets[i];
        while (*link) {
            connection *c = (connection *)*link;
            if ((c->closed && now - c->closed_at >= r->close_linger) || now - c->last_seen >= r->idle_timeout) {
                ct_unlink(&r->table, link);
                free(c);
                expired++;
            } else {
                link = &c->link.chain;
            }
        }
    }
    return expired;
}

void rw_failover(rewriter *r) { r->failed_over = 1; }
int rw_failed_over(const rewriter *r) { return r->failed_over; }
size_t rw_connections(const rewriter *r) { return r->table.count; }
const uint64_t *rw_counters(const rewriter *r) { return r->counters; }

int rw_offset(rewriter *r, uint32_t ip_a, unsigned port_a, uint32_t ip_b, unsigned port_b, uint32_t *offset)
{
    ends e = ends_of(ip_a, port_a, ip_b, port_b);
    const connection *c = find(r, &e);
    if (!c || !c->learned)
        return 0;
    *offset = c->offset;
    return 1;
}

/* --- native.Rewriter ----------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    rewriter *rw;
    PyObject *clock;                /* called once per call that needs the time */
} RewriterObject;

static PyObject *monotonic;         /* time.monotonic, the default clock */

static int now_of(RewriterObject *self, double *now)
{
    PyObject *value = PyObject_CallNoArgs(self->clock);
    if (!value)
        return -1;
    *now = PyFloat_AsDouble(value);
    Py_DECREF(value);
    return *now == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *Rewriter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"idle_timeout_s", "close_linger_s", "clock", NULL};
    double idle_timeout = 3 * 3600, close_linger = 60;
    PyObject *clock = monotonic;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$ddO:Rewriter", kwlist, &idle_timeout, &close_linger, &clock))
        return NULL;
    RewriterObject *self = (RewriterObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->rw = rw_new(idle_timeout, close_linger);
    if (!self->rw) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->clock = Py_NewRef(clock);
    return (PyObject *)self;
}

static int Rewriter_traverse(RewriterObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->clock);
    return 0;
}

static int Rewriter_clear(RewriterObject *self)
{
    Py_CLEAR(self->clock);
    return 0;
}

static void Rewriter_dealloc(RewriterObject *self)
{
    PyObject_GC_UnTrack(self);
    Rewriter_clear(self);
    rw_free(self->rw);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The frame unchanged (the same object) or rewritten into a new bytes object: the
 * caller's buffer is copied first, as PyRewriter's parse() does. */
static PyObject *rewrite(RewriterObject *self, PyObject *frame,
                         int (*direction)(rewriter *, uint8_t *, size_t, double))
{
    Py_buffer b;
    if (PyObject_GetBuffer(frame, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(b.buf, b.len);
    PyBuffer_Release(&b);
    double now;
    if (!out || now_of(self, &now) < 0) {
        Py_XDECREF(out);
        return NULL;
    }
    if (!direction(self->rw, (uint8_t *)PyBytes_AS_STRING(out), (size_t)PyBytes_GET_SIZE(out), now)) {
        Py_DECREF(out);
        return Py_NewRef(frame);
    }
    return out;
}

static PyObject *Rewriter_to_guest(RewriterObject *self, PyObject *frame)
{
    return rewrite(self, frame, rw_to_guest);
}

static PyObject *Rewriter_from_guest(RewriterObject *self, PyObject *frame)
{
    return rewrite(self, frame, rw_from_guest);
}

static PyObject *Rewriter_scan_expired(RewriterObject *self, PyObject *unused)
{
    double now;
    if (now_of(self, &now) < 0)
        return NULL;
    return PyLong_FromSize_t(rw_scan_expired(self->rw, now));
}

static PyObject *Rewriter_checkpoint(RewriterObject *self, PyObject *unused)
{
    rw_checkpoint(self->rw);
    Py_RETURN_NONE;
}

static PyObject *Rewriter_failover(RewriterObject *self, PyObject *unused)
{
    rw_failover(self->rw);
    Py_RETURN_NONE;
}

/* One end of a key, ("a.b.c.d", port): 1 and the address and port, 0 when it is not one. */
static int key_end(PyObject *end, uint32_t *ip, unsigned *port)
{
    if (!PyTuple_Check(end) || PyTuple_GET_SIZE(end) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(end, 0))
        || !PyLong_Check(PyTuple_GET_ITEM(end, 1)))
        return 0;
    const char *text = PyUnicode_AsUTF8(PyTuple_GET_ITEM(end, 0));
    if (!text) {
        PyErr_Clear();
        return 0;
    }
    unsigned a, b, c, d;
    char tail;
    if (sscanf(text, "%3u.%3u.%3u.%3u%c", &a, &b, &c, &d, &tail) != 4 || (a | b | c | d) > 255)
        return 0;
    long value = PyLong_AsLong(PyTuple_GET_ITEM(end, 1));
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (value < 0 || value > 0xFFFF)
        return 0;
    *ip = (uint32_t)a << 24 | b << 16 | c << 8 | d;
    *port = (unsigned)value;
    return 1;
}

/* offset(key): the learned offset of the connection packet.Packet.key names, else None.
 * The key must equal the one Packet.key gives (a dict lookup in Python): the ends here are
 * read, looked up, and the tracked connection's own key compared with it. */
static PyObject *Rewriter_offset(RewriterObject *self, PyObject *key)
{
    if (PyObject_Hash(key) == -1)
        return NULL;
    uint32_t ip_a, ip_b, offset;
    unsigned port_a, port_b;
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 3 || !key_end(PyTuple_GET_ITEM(key, 1), &ip_a, &port_a)
        || !key_end(PyTuple_GET_ITEM(key, 2), &ip_b, &port_b)
        || !rw_offset(self->rw, ip_a, port_a, ip_b, port_b, &offset))
        Py_RETURN_NONE;
    /* Packet.key's own form: protocol 6, the ends as (dotted quad, port), sorted as tuples. */
    char text_a[16], text_b[16];
    snprintf(text_a, sizeof text_a, "%u.%u.%u.%u", ip_a >> 24, ip_a >> 16 & 255, ip_a >> 8 & 255, ip_a & 255);
    snprintf(text_b, sizeof text_b, "%u.%u.%u.%u", ip_b >> 24, ip_b >> 16 & 255, ip_b >> 8 & 255, ip_b & 255);
    PyObject *a = Py_BuildValue("(sI)", text_a, port_a), *b = Py_BuildValue("(sI)", text_b, port_b);
    PyObject *canonical = NULL;
    int ordered = a && b ? PyObject_RichCompareBool(a, b, Py_LE) : -1;
    if (ordered >= 0)
        canonical = ordered ? Py_BuildValue("(iOO)", 6, a, b) : Py_BuildValue("(iOO)", 6, b, a);
    Py_XDECREF(a);
    Py_XDECREF(b);
    if (!canonical)
        return NULL;
    int equal = PyObject_RichCompareBool(key, canonical, Py_EQ);
    Py_DECREF(canonical);
    if (equal < 0)
        return NULL;
    if (!equal)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(offset);
}

static PyObject *Rewriter_get_counters(RewriterObject *self, void *closure)
{
    const uint64_t *n = rw_counters(self->rw);
    return Py_BuildValue("{sKsKsKsKsn}", "to_guest", (unsigned long long)n[RW_TO_GUEST],
                         "from_guest", (unsigned long long)n[RW_FROM_GUEST],
                         "learned", (unsigned long long)n[RW_LEARNED],
                         "malformed", (unsigned long long)n[RW_MALFORMED],
                         "connections", (Py_ssize_t)rw_connections(self->rw));
}

static PyObject *Rewriter_get_failed_over(RewriterObject *self, void *closure)
{
    return PyBool_FromLong(rw_failed_over(self->rw));
}

/* idle_timeout and close_linger: PyRewriter's public attributes, in seconds. */
static PyObject *Rewriter_get_timeout(RewriterObject *self, void *closure)
{
    return PyFloat_FromDouble(closure ? self->rw->close_linger : self->rw->idle_timeout);
}

static int Rewriter_set_timeout(RewriterObject *self, PyObject *value, void *closure)
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete a Rewriter's timeout");
        return -1;
    }
    double seconds = PyFloat_AsDouble(value);
    if (seconds == -1.0 && PyErr_Occurred())
        return -1;
    *(closure ? &self->rw->close_linger : &self->rw->idle_timeout) = seconds;
    return 0;
}

static PyMethodDef Rewriter_methods[] = {
    {"to_guest", (PyCFunction)Rewriter_to_guest, METH_O,
     "A peer's frame for the SVM: ack (and SACK blocks) -= offset."},
    {"from_guest", (PyCFunction)Rewriter_from_guest, METH_O,
     "An SVM frame for the comparer (or, after failover, the peer): seq += offset."},
    {"scan_expired", (PyCFunction)Rewriter_scan_expired, METH_NOARGS,
     "Forgets connections closed close_linger_s ago or idle idle_timeout_s; how many."},
    {"checkpoint", (PyCFunction)Rewriter_checkpoint, METH_NOARGS,
     "The SVM now has the PVM's TCP state: every offset is 0, so nothing is tracked."},
    {"failover", (PyCFunction)Rewriter_failover, METH_NOARGS,
     "The SVM serves alone now: tracked connections keep their offsets, new ones get none."},
    {"offset", (PyCFunction)Rewriter_offset, METH_O,
     "The learned offset of a connection (packet.Packet.key); None when unknown or untracked."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Rewriter_getset[] = {
    {"counters", (getter)Rewriter_get_counters, NULL,
     "Frames rewritten each way, offsets learned, malformed frames passed, connections tracked.", NULL},
    {"failed_over", (getter)Rewriter_get_failed_over, NULL, "failover() was called.", NULL},
    {"idle_timeout", (getter)Rewriter_get_timeout, (setter)Rewriter_set_timeout,
     "Seconds idle before forgotten.", NULL},
    {"close_linger", (getter)Rewriter_get_timeout, (setter)Rewriter_set_timeout,
     "Seconds kept after closing.", (void *)1},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RewriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "native._native.Rewriter",
    .tp_doc = "The COLO TCP rewriter in C, with netfilter.rewriter.PyRewriter's behaviour.",
    .tp_basicsize = sizeof(RewriterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Rewriter_new,
    .tp_dealloc = (destructor)Rewriter_dealloc,
    .tp_traverse = (traverseproc)Rewriter_traverse,
    .tp_clear = (inquiry)Rewriter_clear,
    .tp_methods = Rewriter_methods,
    .tp_getset = Rewriter_getset,
};

rewriter *colo_rewriter_of(PyObject *object)
{
    if (!PyObject_TypeCheck(object, &RewriterType)) {
        PyErr_Format(PyExc_TypeError, "a native.Rewriter is needed, not %.100s", Py_TYPE(object)->tp_name);
        return NULL;
    }
    return ((RewriterObject *)object)->rw;
}

int colo_rewrite_register(PyObject *module)
{
    PyObject *time_module = PyImport_ImportModule("time");
    if (!time_module)
        return -1;
    monotonic = PyObject_GetAttrString(time_module, "monotonic");
    Py_DECREF(time_module);
    if (!monotonic || PyType_Ready(&RewriterType) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "Rewriter", (PyObject *)&RewriterType);
}
