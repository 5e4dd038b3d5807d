/*
 * The COLO datapath in C: the NIC thread's serve loop (rings.c) with the COLO network
 * layer behind the guest's rings instead of the bare tap, so no frame costs Python work
 * (netfilter/primary.py and secondary.py wire it; their threads are its Python twin, used
 * with COLO_NATIVE=0).  On a TLS channel its sockets are the plaintext ends of
 * netfilter/channel.py's TlsRelay, whose threads hand the bytes to Python's ssl.
 *
 *   ColoPrimary.serve (the PVM's NIC thread)
 *     tap ──readv──► PVM RX ring
 *            └─copy──► mirror buffer ──send──► channel out ──► secondary
 *     PVM TX ring ──► cmp_primary ──release──► tap
 *     channel in ──► epoch check ──► cmp_secondary ──release──► tap
 *     every expired_scan_cycle_ms: cmp_scan_expired
 *
 *   ColoSecondary.serve (the SVM's NIC thread)
 *     channel in ──► epoch check ──► rw_to_guest ──► SVM RX ring
 *     SVM TX ring ──► rw_from_guest ──► out buffer ──send──► channel out ──► primary
 *
 * The channel's frames are netfilter/channel.py's: epoch u32, length u32 (big-endian),
 * the frame.  Sockets are only ever used with MSG_DONTWAIT; the loop waits for them in its
 * poll.  serve() hands back to Python what Python must act on: "checkpoint" (the comparer
 * asked; take_request()) and "lost" (the channel broke; take_lost()), once each.
 *
 * Epochs: serve() runs only while the guest runs, and checkpoint(epoch) is called while it
 * is stopped, so every client frame the PVM reads after checkpoint N is mirrored with N,
 * and what either side sent before it carries an older epoch and is dropped on arrival.
 *
 * Locking: the comparer is used by the serving thread and by Python (checkpoint, failover,
 * counters, frames of a Python pass), so each use takes the path's mutex.  The serving
 * thread never takes the GIL, so a Python thread may wait on the mutex holding it.
 */
#include "rings.h"
#include "colo.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_HEAD 8
#define FROM_CHANNEL_CAP (256 * 1024 + FRAME_HEAD + RING_MAX_FRAME)

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- one direction of the packet channel --------------------------------------------- */

typedef struct {
    uint8_t *data;
    size_t cap, start, end;      /* bytes [start, end) are waiting */
} stream_buf;

static int buf_init(stream_buf *b, size_t cap)
{
    b->data = PyMem_RawMalloc(cap);
    b->cap = cap;
    b->start = b->end = 0;
    return b->data ? 0 : -1;
}

static int buf_pending(const stream_buf *b) { return b->end > b->start; }

/* Room for `need` more bytes at the end (moving what waits to the front if that helps). */
static int buf_room(stream_buf *b, size_t need)
{
    if (b->cap - b->end >= need)
        return 1;
    if (b->start) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
    }
    return b->cap - b->end >= need;
}

/* Appends a frame's header and body; the body's place in the buffer, or NULL when the
 * buffer holds `limit` bytes or more already. */
static uint8_t *buf_put_frame(stream_buf *b, size_t limit, uint32_t epoch, const uint8_t *frame, uint32_t len)
{
    if (b->end - b->start >= limit || !buf_room(b, FRAME_HEAD + (size_t)len))
        return NULL;
    uint8_t *at = b->data + b->end;
    pkt_put_be32(at, epoch);
    pkt_put_be32(at + 4, len);
    memcpy(at + FRAME_HEAD, frame, len);
    b->end += FRAME_HEAD + (size_t)len;
    return at + FRAME_HEAD;
}

/* The channel's state on one side: what failed, said once. */
typedef struct {
    int out_fd, in_fd;
    int in_readable;            /* as the last poll said (1 until it said otherwise) */
    stream_buf out, in;
    size_t out_limit;
    char lost[160];
    int lost_told;
} channel;

static void channel_lose(channel *c, const char *why)
{
    if (!c->lost[0])
        snprintf(c->lost, sizeof c->lost, "packet channel: %s", why);
}

/* Sends what waits; sets *worked if anything went. */
static void channel_flush(channel *c, int *worked)
{
    while (!c->lost[0] && buf_pending(&c->out)) {
        ssize_t sent = send(c->out_fd, c->out.data + c->out.start, c->out.end - c->out.start,
                            MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                channel_lose(c, strerror(errno));
            return;
        }
        c->out.start += (size_t)sent;
        *worked = 1;
    }
    if (!buf_pending(&c->out))
        c->out.start = c->out.end = 0;
}

/* One read of what the peer sent, as far as the buffer has room. */
static void channel_fill(channel *c, int *worked)
{
    if (c->lost[0] || !c->in_readable || !buf_room(&c->in, 1))
        return;
    ssize_t got;
    size_t room = c->in.cap - c->in.end;
    do
        got = recv(c->in_fd, c->in.data + c->in.end, room, MSG_DONTWAIT);
    while (got < 0 && errno == EINTR);
    if (got > 0) {
        c->in.end += (size_t)got;
        c->in_readable = (size_t)got == room;      /* a short read took all there was */
        *worked = 1;
    } else if (got == 0)
        channel_lose(c, "the peer closed it");
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
        channel_lose(c, strerror(errno));
    else
        c->in_readable = 0;
}

static void channel_polled(channel *c, const struct pollfd *fds, int n)
{
    serve_note_readable(fds, n, c->in_fd, &c->in_readable);
}

/* The next whole frame received: 1 with its epoch, body and length (not consumed yet),
 * 0 when it has not all arrived, -1 when it is over the limit (the channel is lost). */
static int channel_peek(channel *c, uint32_t *epoch, uint8_t **frame, uint32_t *len)
{
    size_t waiting = c->in.end - c->in.start;
    if (waiting < FRAME_HEAD)
        return 0;
    uint8_t *at = c->in.data + c->in.start;
    *epoch = pkt_be32(at);
    *len = pkt_be32(at + 4);
    if (*len > RING_MAX_FRAME) {
        char why[64];
        snprintf(why, sizeof why, "a frame of %u bytes", *len);
        channel_lose(c, why);
        return -1;
    }
    if (waiting < FRAME_HEAD + (size_t)*len)
        return 0;
    *frame = at + FRAME_HEAD;
    return 1;
}

static void channel_consume(channel *c, uint32_t len)
{
    c->in.start += FRAME_HEAD + (size_t)len;
    if (c->in.start == c->in.end)
        c->in.start = c->in.end = 0;
}

/* Its pollfds: readable input while there is room for it, writable output while some waits. */
static int channel_wait_fds(channel *c, struct pollfd *fds, int read)
{
    if (c->lost[0])
        return 0;
    int n = 0;
    if (read && c->in.end - c->in.start < c->in.cap)
        fds[n++] = (struct pollfd){c->in_fd, POLLIN, 0};
    if (buf_pending(&c->out))
        fds[n++] = (struct pollfd){c->out_fd, POLLOUT, 0};
    return n;
}

static int channel_init(channel *c, int out_fd, int in_fd, size_t out_limit)
{
    memset(c, 0, sizeof *c);
    c->out_fd = out_fd;
    c->in_fd = in_fd;
    c->in_readable = 1;
    c->out_limit = out_limit;
    if (buf_init(&c->out, out_limit + FRAME_HEAD + RING_MAX_FRAME) < 0 || buf_init(&c->in, FROM_CHANNEL_CAP) < 0)
        return -1;
    return 0;
}

static void channel_free(channel *c)
{
    PyMem_RawFree(c->out.data);
    PyMem_RawFree(c->in.data);
    c->out.data = c->in.data = NULL;
}

static PyObject *channel_take_lost(channel *c)
{
    if (!c->lost[0] || c->lost_told)
        Py_RETURN_NONE;
    c->lost_told = 1;
    return PyUnicode_FromString(c->lost);
}

/* serve()'s "lost", once: the loop then runs on without the channel until Python stops it. */
static const char *channel_news(channel *c)
{
    return c->lost[0] && !c->lost_told ? "lost" : NULL;
}

/* --- the primary --------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    serve_port port;
    pthread_mutex_t lock;
    comparer *cmp;
    channel ch;                 /* out: client frames to the SVM; in: the SVM's output */
    int tap, tap_readable;
    uint32_t epoch;             /* the checkpoint the PVM's input follows */
    double scan_every, next_scan;
    char request[32];           /* a checkpoint the comparer asked for, not told to Python yet */
    uint64_t mirrored, mirror_dropped, svm_frames, stale_dropped, release_failed;
    uint8_t scratch[RING_MAX_FRAME];
} ColoPrimary;

#define PRIMARY_OF(p) ((ColoPrimary *)((char *)(p) - offsetof(ColoPrimary, port)))

static void primary_release(void *ctx, const uint8_t *frame, size_t len)
{
    ColoPrimary *self = ctx;
    if (write(self->tap, frame, len) != (ssize_t)len)
        self->release_failed++;
}

static void primary_request(void *ctx, const char *reason)
{
    ColoPrimary *self = ctx;
    if (!self->request[0])
        snprintf(self->request, sizeof self->request, "%s", reason);
}

static int primary_tx(serve_port *p, serve_ctx *s, const uint8_t *frame, uint32_t len)
{
    ColoPrimary *self = PRIMARY_OF(p);
    pthread_mutex_lock(&self->lock);
    cmp_primary(self->cmp, frame, len, monotonic());
    pthread_mutex_unlock(&self->lock);
    s->sent++;
    s->tx_bytes += len;
    return 1;
}

static void primary_mirror(void *ctx, const uint8_t *frame, uint32_t len)
{
    ColoPrimary *self = ctx;
    if (self->ch.lost[0])
        return;
    if (buf_put_frame(&self->ch.out, self->ch.out_limit, self->epoch, frame, len))
        self->mirrored++;
    else
        self->mirror_dropped++;
}

static long primary_rx(serve_port *p, serve_ctx *s, long limit)
{
    ColoPrimary *self = PRIMARY_OF(p);
    return serve_rx_from_fd(s, self->tap, &self->tap_readable, limit, self->scratch, primary_mirror, self);
}

static void primary_polled(serve_port *p, const struct pollfd *fds, int n)
{
    ColoPrimary *self = PRIMARY_OF(p);
    channel_polled(&self->ch, fds, n);
    serve_note_readable(fds, n, self->tap, &self->tap_readable);
}

static const char *primary_pass(serve_port *p, int *worked)
{
    ColoPrimary *self = PRIMARY_OF(p);
    channel *c = &self->ch;
    channel_flush(c, worked);
    channel_fill(c, worked);
    uint32_t epoch, len;
    uint8_t *frame;
    double now = monotonic();
    pthread_mutex_lock(&self->lock);
    while (channel_peek(c, &epoch, &frame, &len) > 0) {
        self->svm_frames++;
        if (epoch >= self->epoch)
            cmp_secondary(self->cmp, frame, len, now);
        else
            self->stale_dropped++;
        channel_consume(c, len);
    }
    if (now >= self->next_scan) {
        cmp_scan_expired(self->cmp, now);
        self->next_scan = now + self->scan_every;
    }
    pthread_mutex_unlock(&self->lock);
    if (self->request[0])
        return "checkpoint";
    return channel_news(c);
}

static int primary_wait_fds(serve_port *p, struct pollfd *fds, int rx_room, int *timeout_ms)
{
    ColoPrimary *self = PRIMARY_OF(p);
    int n = channel_wait_fds(&self->ch, fds, 1);
    if (rx_room)
        fds[n++] = (struct pollfd){self->tap, POLLIN, 0};
    int to_scan = (int)((self->next_scan - monotonic()) * 1000) + 1;
    if (to_scan < *timeout_ms)
        *timeout_ms = to_scan < 0 ? 0 : to_scan;
    return n;
}

static int ColoPrimary_init(ColoPrimary *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"tap", "out_fd", "in_fd", "compare_timeout_ms", "max_queue_size", "passthrough",
                               "expired_scan_cycle_ms", "mirror_limit", NULL};
    int tap, out_fd, in_fd;
    unsigned int timeout_ms, queue_size, scan_ms;
    unsigned long long mirror_limit;
    PyObject *passthrough;
    if (self->cmp) {
        PyErr_SetString(PyExc_RuntimeError, "ColoPrimary is set up once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iii$IIOIK", keywords, &tap, &out_fd, &in_fd, &timeout_ms,
                                     &queue_size, &passthrough, &scan_ms, &mirror_limit))
        return -1;
    PyObject *set;
    Py_ssize_t n;
    cmp_passthrough *rules = cmp_passthrough_parse(passthrough, &set, &n);
    if (!rules)
        return -1;
    Py_DECREF(set);
    self->cmp = cmp_new(timeout_ms, queue_size, rules, (size_t)n, primary_release, primary_request, self);
    PyMem_Free(rules);
    if (!self->cmp) {
        PyErr_SetString(PyExc_ValueError, "comparer: bad settings (timeouts and queue size positive, "
                        "passthrough protocols 6 or 17)");
        return -1;
    }
    if (channel_init(&self->ch, out_fd, in_fd, (size_t)mirror_limit) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&self->lock, NULL);
    self->port = (serve_port){primary_tx, primary_rx, primary_pass, primary_wait_fds, primary_polled};
    self->tap = tap;
    self->tap_readable = 1;
    self->scan_every = scan_ms / 1000.0;
    self->next_scan = monotonic() + self->scan_every;
    return 0;
}

static void ColoPrimary_dealloc(ColoPrimary *self)
{
    if (self->cmp) {
        cmp_free(self->cmp);
        pthread_mutex_destroy(&self->lock);
    }
    channel_free(&self->ch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int primary_ready(ColoPrimary *self)
{
    if (self->cmp)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "ColoPrimary is not set up");
    return 0;
}

static PyObject *ColoPrimary_serve(ColoPrimary *self, PyObject *args)
{
    return primary_ready(self) ? serve_rings(&self->port, args) : NULL;
}

static PyObject *ColoPrimary_take_request(ColoPrimary *self, PyObject *unused)
{
    if (!self->request[0])
        Py_RETURN_NONE;
    PyObject *reason = PyUnicode_FromString(self->request);
    self->request[0] = 0;
    return reason;
}

static PyObject *ColoPrimary_take_lost(ColoPrimary *self, PyObject *unused)
{
    return channel_take_lost(&self->ch);
}

/* A frame the PVM sent through a Python pass of its NIC (NicBackend.transmit). */
static PyObject *ColoPrimary_compare(ColoPrimary *self, PyObject *arg)
{
    Py_buffer b;
    if (!primary_ready(self) || PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&self->lock);
    cmp_primary(self->cmp, b.buf, (size_t)b.len, monotonic());
    pthread_mutex_unlock(&self->lock);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* A client frame the PVM read through a Python pass (NicBackend.receive): sent to the SVM
 * with the next serve(). */
static PyObject *ColoPrimary_mirror(ColoPrimary *self, PyObject *arg)
{
    Py_buffer b;
    if (!primary_ready(self) || PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    if (b.len > RING_MAX_FRAME)
        self->mirror_dropped++;
    else
        primary_mirror(self, b.buf, (uint32_t)b.len);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *ColoPrimary_checkpoint(ColoPrimary *self, PyObject *arg)
{
    unsigned long epoch = PyLong_AsUnsignedLong(arg);
    if (!primary_ready(self) || PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&self->lock);
    cmp_checkpoint(self->cmp);
    self->epoch = (uint32_t)epoch;
    self->request[0] = 0;           /* asked before this checkpoint: answered by it */
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *ColoPrimary_failover(ColoPrimary *self, PyObject *unused)
{
    if (!primary_ready(self))
        return NULL;
    pthread_mutex_lock(&self->lock);
    cmp_failover(self->cmp);
    pthread_mutex_unlock(&self->lock);
    Py_RETURN_NONE;
}

static PyObject *ColoPrimary_counters(ColoPrimary *self, PyObject *unused)
{
    if (!primary_ready(self))
        return NULL;
    uint64_t counts[PKT_FLOWS][CMP_COUNTERS];
    pthread_mutex_lock(&self->lock);
    memcpy(counts, cmp_counters(self->cmp), sizeof counts);
    uint64_t held = cmp_held(self->cmp);
    pthread_mutex_unlock(&self->lock);
    PyObject *result = cmp_counters_dict((const uint64_t (*)[CMP_COUNTERS])counts);
    if (!result)
        return NULL;
    PyObject *extra = Py_BuildValue("{sKsKsKsKsKsK}", "mirrored", self->mirrored, "mirror-dropped",
                                    self->mirror_dropped, "svm-frames", self->svm_frames, "stale-dropped",
                                    self->stale_dropped, "release-failed", self->release_failed, "held", held);
    if (!extra || PyDict_Update(result, extra) < 0)
        Py_CLEAR(result);
    Py_XDECREF(extra);
    return result;
}

static PyMethodDef ColoPrimary_methods[] = {
    {"serve", (PyCFunction)ColoPrimary_serve, METH_VARARGS,
     "ring_serve_tap's loop and arguments (without the tap), with the COLO primary behind the rings."},
    {"take_request", (PyCFunction)ColoPrimary_take_request, METH_NOARGS,
     "The checkpoint reason the comparer asked for since the last call, or None."},
    {"take_lost", (PyCFunction)ColoPrimary_take_lost, METH_NOARGS,
     "Why the packet channel broke, the first time it is asked; else None."},
    {"compare", (PyCFunction)ColoPrimary_compare, METH_O, "A PVM frame from a Python pass, to the comparer."},
    {"mirror", (PyCFunction)ColoPrimary_mirror, METH_O, "A client frame from a Python pass, to the SVM."},
    {"checkpoint", (PyCFunction)ColoPrimary_checkpoint, METH_O,
     "Both guests are equal as of this epoch (the PVM is stopped): release, drop, compare afresh."},
    {"failover", (PyCFunction)ColoPrimary_failover, METH_NOARGS,
     "COLO is over: every held frame goes out, later ones pass unchecked."},
    {"counters", (PyCFunction)ColoPrimary_counters, METH_NOARGS,
     "The comparer's counters per flow class, and the mirror's and channel's."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ColoPrimaryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "native._native.ColoPrimary",
    .tp_basicsize = sizeof(ColoPrimary),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The COLO primary's datapath: mirror, comparer and packet channel behind the PVM's rings.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ColoPrimary_init,
    .tp_dealloc = (destructor)ColoPrimary_dealloc,
    .tp_methods = ColoPrimary_methods,
};

/* --- the secondary ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    serve_port port;
    PyObject *rewriter_object;  /* a native.Rewriter: it outlives COLO, rewriting after failover */
    rewriter *rw;
    channel ch;                 /* in: client frames the PVM read; out: the SVM's output */
    uint32_t epoch;             /* the checkpoint the SVM follows */
    uint64_t diverge_at, data_segments;
    uint64_t from_primary, to_primary, checkpoint_dropped, svm_dropped;
} ColoSecondary;

#define SECONDARY_OF(p) ((ColoSecondary *)((char *)(p) - offsetof(ColoSecondary, port)))

/* The test hook of netfilter/secondary.py (COLO_APPLIANCE_TEST_DIVERGE_SVM): the SVM's Nth
 * TCP segment with data leaves with its last byte changed, as if the SVM had diverged. */
static void secondary_diverge(ColoSecondary *self, uint8_t *frame, uint32_t len)
{
    pkt_info k;
    if (pkt_parse(frame, len, &k) < 0 || k.flow != PKT_TCP || !k.payload_len)
        return;
    if (++self->data_segments != self->diverge_at)
        return;
    fprintf(stderr, "colo_path: test hook: the SVM's TCP segment %llu diverges\n",
            (unsigned long long)self->diverge_at);
    frame[k.ip_end - 1] ^= 0x20;
    pkt_fill_tcp_checksum(frame, &k);
}

/* An SVM frame into the out buffer, rewritten there: 0 when the buffer is full. */
static int secondary_send(ColoSecondary *self, const uint8_t *frame, uint32_t len)
{
    uint8_t *copy = buf_put_frame(&self->ch.out, self->ch.out_limit, self->epoch, frame, len);
    if (!copy)
        return 0;
    rw_from_guest(self->rw, copy, len, monotonic());
    if (self->diverge_at)
        secondary_diverge(self, copy, len);
    self->to_primary++;
    return 1;
}

static int secondary_tx(serve_port *p, serve_ctx *s, const uint8_t *frame, uint32_t len)
{
    ColoSecondary *self = SECONDARY_OF(p);
    if (self->ch.lost[0]) {              /* nowhere to go until COLO stops: dropped */
        s->dropped++;
        self->svm_dropped++;
        return 1;
    }
    if (!secondary_send(self, frame, len))
        return 0;                       /* wait for the channel: the guest's TX ring holds it */
    s->sent++;
    s->tx_bytes += len;
    return 1;
}

static long secondary_rx(serve_port *p, serve_ctx *s, long limit)
{
    ColoSecondary *self = SECONDARY_OF(p);
    channel *c = &self->ch;
    long moved = 0;
    uint32_t epoch, len;
    uint8_t *frame;
    while (moved < limit && channel_peek(c, &epoch, &frame, &len) > 0) {
        if (epoch < self->epoch) {       /* the PVM read it before the last checkpoint */
            self->checkpoint_dropped++;
            channel_consume(c, len);
            continue;
        }
        uint8_t *buffer;
        uint32_t capacity;
        int slot = serve_rx_slot(s, &buffer, &capacity);
        if (slot < 0)
            return -1;
        if (!slot)
            break;
        if (len <= capacity) {
            memcpy(buffer, frame, len);
            rw_to_guest(self->rw, buffer, len, monotonic());
        }
        serve_rx_commit(s, len, capacity);
        self->from_primary++;
        channel_consume(c, len);
        moved++;
    }
    return moved;
}

static const char *secondary_pass(serve_port *p, int *worked)
{
    ColoSecondary *self = SECONDARY_OF(p);
    channel_flush(&self->ch, worked);
    channel_fill(&self->ch, worked);
    uint32_t epoch, len;
    uint8_t *frame;
    channel_peek(&self->ch, &epoch, &frame, &len);      /* an oversized frame loses the channel now */
    return channel_news(&self->ch);
}

static int secondary_wait_fds(serve_port *p, struct pollfd *fds, int rx_room, int *timeout_ms)
{
    ColoSecondary *self = SECONDARY_OF(p);
    return channel_wait_fds(&self->ch, fds, rx_room);
}

static void secondary_polled(serve_port *p, const struct pollfd *fds, int n)
{
    channel_polled(&SECONDARY_OF(p)->ch, fds, n);
}

static int ColoSecondary_init(ColoSecondary *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"in_fd", "out_fd", "rewriter", "out_limit", "diverge_at", NULL};
    int in_fd, out_fd;
    PyObject *rewriter_object;
    unsigned long long out_limit, diverge_at;
    if (self->rw) {
        PyErr_SetString(PyExc_RuntimeError, "ColoSecondary is set up once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiO$KK", keywords, &in_fd, &out_fd, &rewriter_object,
                                     &out_limit, &diverge_at))
        return -1;
    rewriter *rw = colo_rewriter_of(rewriter_object);
    if (!rw)
        return -1;
    if (channel_init(&self->ch, out_fd, in_fd, (size_t)out_limit) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(rewriter_object);
    self->rewriter_object = rewriter_object;
    self->rw = rw;
    self->diverge_at = diverge_at;
    self->port = (serve_port){secondary_tx, secondary_rx, secondary_pass, secondary_wait_fds, secondary_polled};
    return 0;
}

static void ColoSecondary_dealloc(ColoSecondary *self)
{
    Py_XDECREF(self->rewriter_object);
    channel_free(&self->ch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int secondary_ready(ColoSecondary *self)
{
    if (self->rw)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "ColoSecondary is not set up");
    return 0;
}

static PyObject *ColoSecondary_serve(ColoSecondary *self, PyObject *args)
{
    return secondary_ready(self) ? serve_rings(&self->port, args) : NULL;
}

static PyObject *ColoSecondary_take_lost(ColoSecondary *self, PyObject *unused)
{
    return channel_take_lost(&self->ch);
}

/* An SVM frame from a Python pass of its NIC (NicBackend.transmit): False when dropped. */
static PyObject *ColoSecondary_send(ColoSecondary *self, PyObject *arg)
{
    Py_buffer b;
    if (!secondary_ready(self) || PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int sent = b.len <= RING_MAX_FRAME && !self->ch.lost[0] && secondary_send(self, b.buf, (uint32_t)b.len);
    if (!sent)
        self->svm_dropped++;
    PyBuffer_Release(&b);
    return PyBool_FromLong(sent);
}

static PyObject *ColoSecondary_checkpoint(ColoSecondary *self, PyObject *arg)
{
    unsigned long epoch = PyLong_AsUnsignedLong(arg);
    if (!secondary_ready(self) || PyErr_Occurred())
        return NULL;
    self->epoch = (uint32_t)epoch;
    rw_checkpoint(self->rw);
    Py_RETURN_NONE;
}

static PyObject *ColoSecondary_counters(ColoSecondary *self, PyObject *unused)
{
    return Py_BuildValue("{sKsKsKsK}", "from-primary", self->from_primary, "to-primary", self->to_primary,
                         "checkpoint-dropped", self->checkpoint_dropped, "svm-dropped", self->svm_dropped);
}

static PyMethodDef ColoSecondary_methods[] = {
    {"serve", (PyCFunction)ColoSecondary_serve, METH_VARARGS,
     "ring_serve_tap's loop and arguments (without the tap), with the COLO secondary behind the rings."},
    {"take_lost", (PyCFunction)ColoSecondary_take_lost, METH_NOARGS,
     "Why the packet channel broke, the first time it is asked; else None."},
    {"send", (PyCFunction)ColoSecondary_send, METH_O, "An SVM frame from a Python pass, to the primary."},
    {"checkpoint", (PyCFunction)ColoSecondary_checkpoint, METH_O,
     "The SVM (stopped) loads this checkpoint: older frames are stale, offsets reset."},
    {"counters", (PyCFunction)ColoSecondary_counters, METH_NOARGS, "Frames each way and frames dropped."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ColoSecondaryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "native._native.ColoSecondary",
    .tp_basicsize = sizeof(ColoSecondary),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The COLO secondary's datapath: redirector and rewriter behind the SVM's rings.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ColoSecondary_init,
    .tp_dealloc = (destructor)ColoSecondary_dealloc,
    .tp_methods = ColoSecondary_methods,
};

int colo_path_register(PyObject *module)
{
    if (PyType_Ready(&ColoPrimaryType) < 0 || PyType_Ready(&ColoSecondaryType) < 0)
        return -1;
    Py_INCREF(&ColoPrimaryType);
    if (PyModule_AddObject(module, "ColoPrimary", (PyObject *)&ColoPrimaryType) < 0) {
        Py_DECREF(&ColoPrimaryType);
        return -1;
    }
    Py_INCREF(&ColoSecondaryType);
    if (PyModule_AddObject(module, "ColoSecondary", (PyObject *)&ColoSecondaryType) < 0) {
        Py_DECREF(&ColoSecondaryType);
        return -1;
    }
    return 0;
}
