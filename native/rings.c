/*
 * The NIC rings' host side: accessors, the Python functions, and the serve loop
 * (rings.h says what each is for; docs/guest-abi.md draws the rings).
 */
#include "rings.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Dirty bits are set and taken atomically (bitmap_mark, bitmap_take): the NIC thread marks
 * pages without the GIL or the bitmap's lock while the vCPU thread and migration use it. */
void mark_pages(uint8_t *bits, uint64_t gpa, uint64_t len)
{
    for (uint64_t page = gpa >> 12; page <= (gpa + len - 1) >> 12; page++)
        __atomic_fetch_or(&bits[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELEASE);
}

static void ring_mark(ring_ctx *r, uint64_t gpa, uint64_t len)
{
    mark_pages(r->bits, gpa, len);
}

static uint32_t ring_u32(ring_ctx *r, uint64_t off)
{
    uint32_t v;
    memcpy(&v, r->mem + off, 4);
    return __atomic_load_n(&v, __ATOMIC_ACQUIRE);
}

static void ring_put_u32(ring_ctx *r, uint64_t off, uint32_t v)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(r->mem + off, &v, 4);
    ring_mark(r, off, 4);
}

static int ring_open(ring_ctx *r, PyObject *ram, PyObject *dirty, uint64_t ctrl, uint64_t ring, uint64_t slots)
{
    if (PyObject_GetBuffer(ram, &r->ram, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(dirty, &r->dirty, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&r->ram);
        return -1;
    }
    r->mem = r->ram.buf;
    r->bits = r->dirty.buf;
    r->size_bytes = (uint64_t)r->ram.len;
    r->ctrl = ctrl;
    r->ring = ring;
    r->slots = (uint32_t)slots;
    r->error[0] = 0;
    const char *bad = NULL;
    if ((uint64_t)r->dirty.len * 8 < (r->size_bytes + 4095) / 4096)
        bad = "dirty bitmap too small for RAM";
    else if (slots == 0 || (slots & (slots - 1)) || slots > 32768)
        snprintf(r->error, sizeof r->error, "ring size %llu is not a power of two up to 32768",
                 (unsigned long long)slots);
    else if (ctrl + RING_CTRL_SIZE > r->size_bytes || ctrl + RING_CTRL_SIZE < ctrl ||
             ring + slots * RING_DESC_SIZE > r->size_bytes || ring + slots * RING_DESC_SIZE < ring)
        bad = "ring outside guest RAM";
    if (bad)
        snprintf(r->error, sizeof r->error, "%s", bad);
    if (r->error[0]) {
        PyErr_SetString(PyExc_ValueError, r->error);
        PyBuffer_Release(&r->ram);
        PyBuffer_Release(&r->dirty);
        return -1;
    }
    return 0;
}

static void ring_close(ring_ctx *r)
{
    PyBuffer_Release(&r->ram);
    PyBuffer_Release(&r->dirty);
}

/* Outstanding entries between two free-running indexes, or -1 (r->error set) on overrun. */
static int64_t ring_outstanding(ring_ctx *r, uint32_t ahead, uint32_t behind, const char *what)
{
    uint32_t count = ahead - behind;
    if (count > r->slots) {
        snprintf(r->error, sizeof r->error, "%s index overrun: %u outstanding on a ring of %u",
                 what, count, r->slots);
        return -1;
    }
    return count;
}

/* The descriptor at `index`: 0 with its gpa, buffer and length, or -1 (r->error set). */
static int ring_desc(ring_ctx *r, uint32_t index, const char *what, uint64_t *at, uint64_t *addr, uint32_t *len)
{
    uint32_t slot = index & (r->slots - 1);
    *at = r->ring + (uint64_t)slot * RING_DESC_SIZE;
    memcpy(addr, r->mem + *at, 8);
    memcpy(len, r->mem + *at + 8, 4);
    if (*len == 0 || *len > RING_MAX_FRAME) {
        snprintf(r->error, sizeof r->error, "%s descriptor %u: absurd length %u", what, slot, *len);
        return -1;
    }
    if (*addr > r->size_bytes || *addr + *len > r->size_bytes) {
        snprintf(r->error, sizeof r->error,
                 "%s descriptor %u: buffer [%#llx, +%#x) is outside guest RAM (size %#llx)", what, slot,
                 (unsigned long long)*addr, *len, (unsigned long long)r->size_bytes);
        return -1;
    }
    return 0;
}

static PyObject *ring_fail(ring_ctx *r)
{
    PyErr_SetString(PyExc_ValueError, r->error);
    ring_close(r);
    return NULL;
}

PyObject *ring_tx_pop(PyObject *self, PyObject *args)
{
    PyObject *ram, *dirty;
    unsigned long long ctrl, ring, slots, limit;
    unsigned int cons;
    if (!PyArg_ParseTuple(args, "OOKKKIK", &ram, &dirty, &ctrl, &ring, &slots, &cons, &limit))
        return NULL;
    ring_ctx r;
    if (ring_open(&r, ram, dirty, ctrl, ring, slots) < 0)
        return NULL;
    int64_t pending = ring_outstanding(&r, ring_u32(&r, ctrl + RING_TX_PROD), cons, "TX producer");
    if (pending < 0)
        return ring_fail(&r);
    if ((uint64_t)pending > limit)
        pending = (int64_t)limit;
    PyObject *frames = PyList_New(0);
    if (!frames) {
        ring_close(&r);
        return NULL;
    }
    for (int64_t i = 0; i < pending; i++, cons++) {
        uint64_t at, addr;
        uint32_t len;
        if (ring_desc(&r, cons, "TX", &at, &addr, &len) < 0) {
            Py_DECREF(frames);
            return ring_fail(&r);
        }
        PyObject *frame = PyBytes_FromStringAndSize((const char *)r.mem + addr, len);
        if (!frame || PyList_Append(frames, frame) < 0) {
            Py_XDECREF(frame);
            Py_DECREF(frames);
            ring_close(&r);
            return NULL;
        }
        Py_DECREF(frame);
    }
    if (pending)
        ring_put_u32(&r, ctrl + RING_TX_CONS, cons);
    ring_close(&r);
    return Py_BuildValue("(IN)", cons, frames);
}

/* Publishes a frame of `len` bytes already in the buffer of descriptor `used`. */
static void ring_rx_publish(ring_ctx *r, uint64_t at, uint64_t addr, uint32_t len)
{
    ring_mark(r, addr, len);
    memcpy(r->mem + at + 8, &len, 4);
    ring_mark(r, at + 8, 4);
}

PyObject *ring_rx_push(PyObject *self, PyObject *args)
{
    PyObject *ram, *dirty, *frames;
    unsigned long long ctrl, ring, slots;
    unsigned int used;
    if (!PyArg_ParseTuple(args, "OOKKKIO", &ram, &dirty, &ctrl, &ring, &slots, &used, &frames))
        return NULL;
    PyObject *seq = PySequence_Fast(frames, "frames must be a sequence of bytes");
    if (!seq)
        return NULL;
    ring_ctx r;
    if (ring_open(&r, ram, dirty, ctrl, ring, slots) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    int64_t free_slots = ring_outstanding(&r, ring_u32(&r, ctrl + RING_RX_AVAIL), used, "RX available");
    if (free_slots < 0) {
        Py_DECREF(seq);
        return ring_fail(&r);
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), taken = 0, too_big = 0, placed = 0;
    for (; taken < n && placed < free_slots; taken++) {
        PyObject *frame = PySequence_Fast_GET_ITEM(seq, taken);
        char *data;
        Py_ssize_t flen;
        if (PyBytes_AsStringAndSize(frame, &data, &flen) < 0) {
            Py_DECREF(seq);
            ring_close(&r);
            return NULL;
        }
        uint64_t at, addr;
        uint32_t cap;
        if (ring_desc(&r, used, "RX", &at, &addr, &cap) < 0) {
            Py_DECREF(seq);
            return ring_fail(&r);
        }
        if ((uint64_t)flen > cap) {
            too_big++;
            continue;
        }
        memcpy(r.mem + addr, data, (size_t)flen);
        ring_rx_publish(&r, at, addr, (uint32_t)flen);
        used++;
        placed++;
    }
    Py_DECREF(seq);
    if (placed)
        ring_put_u32(&r, ctrl + RING_RX_USED, used);
    ring_close(&r);
    return Py_BuildValue("(Inn)", used, taken, too_big);
}

PyObject *ring_arm(PyObject *self, PyObject *args)
{
    PyObject *ram, *dirty;
    unsigned long long ctrl;
    unsigned int tx_notify, rx_notify;
    if (!PyArg_ParseTuple(args, "OOKII", &ram, &dirty, &ctrl, &tx_notify, &rx_notify))
        return NULL;
    ring_ctx r;
    if (ring_open(&r, ram, dirty, ctrl, ctrl, 1) < 0)
        return NULL;
    ring_put_u32(&r, ctrl + RING_TX_NOTIFY, tx_notify);
    ring_put_u32(&r, ctrl + RING_RX_NOTIFY, rx_notify);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* the guest's mfence pairs with this */
    uint32_t tx_prod = ring_u32(&r, ctrl + RING_TX_PROD), rx_avail = ring_u32(&r, ctrl + RING_RX_AVAIL);
    ring_close(&r);
    return Py_BuildValue("(II)", tx_prod, rx_avail);
}

/* --- the serve loop ------------------------------------------------------------------ */

#include <poll.h>

static void eventfd_signal(int fd)
{
    uint64_t one = 1;
    ssize_t ignored = write(fd, &one, 8);
    (void)ignored;
}

static void eventfd_drain(int fd)
{
    uint64_t value;
    ssize_t ignored = read(fd, &value, 8);
    (void)ignored;
}

/* One TX batch to the port: frames taken, or -1 (s->failed). */
static long serve_tx(serve_ctx *s, serve_port *port, long limit)
{
    ring_ctx *r = &s->tx;
    s->tx_blocked = 0;
    int64_t pending = ring_outstanding(r, ring_u32(r, r->ctrl + RING_TX_PROD), s->tx_cons, "TX producer");
    if (pending < 0) {
        s->failed = r;
        return -1;
    }
    if (pending > limit)
        pending = limit;
    long taken = 0;
    for (; taken < pending; taken++, s->tx_cons++) {
        uint64_t at, addr;
        uint32_t len;
        if (ring_desc(r, s->tx_cons, "TX", &at, &addr, &len) < 0) {
            s->failed = r;
            return -1;
        }
        if (!port->tx(port, s, r->mem + addr, len)) {
            s->tx_blocked = 1;
            break;
        }
    }
    if (taken) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy(r->mem + r->ctrl + RING_TX_CONS, &s->tx_cons, 4);
        mark_pages(r->bits, r->ctrl + RING_TX_CONS, 4);
    }
    return taken;
}

/* Free RX slots, or -1 (s->failed). */
static int64_t serve_rx_free(serve_ctx *s)
{
    ring_ctx *r = &s->rx;
    int64_t free_slots = ring_outstanding(r, ring_u32(r, r->ctrl + RING_RX_AVAIL), s->rx_used, "RX available");
    if (free_slots < 0)
        s->failed = r;
    return free_slots;
}

int serve_rx_slot(serve_ctx *s, uint8_t **buffer, uint32_t *capacity)
{
    int64_t free_slots = serve_rx_free(s);
    if (free_slots <= 0)
        return (int)free_slots;
    if (ring_desc(&s->rx, s->rx_used, "RX", &s->slot_at, &s->slot_addr, capacity) < 0) {
        s->failed = &s->rx;
        return -1;
    }
    *buffer = s->rx.mem + s->slot_addr;
    return 1;
}

void serve_rx_commit(serve_ctx *s, uint32_t len, uint32_t capacity)
{
    ring_ctx *r = &s->rx;
    if (len > capacity) {                   /* what was written into the buffer is still a write */
        mark_pages(r->bits, s->slot_addr, capacity);
        s->too_big++;
        return;
    }
    mark_pages(r->bits, s->slot_addr, len);
    memcpy(r->mem + s->slot_at + 8, &len, 4);
    mark_pages(r->bits, s->slot_at + 8, 4);
    s->rx_used++;
    s->placed++;
    s->received++;
    s->rx_bytes += len;
}

void serve_rx_publish(serve_ctx *s)
{
    ring_ctx *r = &s->rx;
    if (!s->placed)
        return;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(r->mem + r->ctrl + RING_RX_USED, &s->rx_used, 4);
    mark_pages(r->bits, r->ctrl + RING_RX_USED, 4);
    s->placed = 0;
}

static void serve_arm(serve_ctx *s, uint32_t tx_notify, uint32_t rx_notify)
{
    ring_ctx *r = &s->tx;
    memcpy(r->mem + r->ctrl + RING_TX_NOTIFY, &tx_notify, 4);
    memcpy(r->mem + r->ctrl + RING_RX_NOTIFY, &rx_notify, 4);
    mark_pages(r->bits, r->ctrl + RING_TX_NOTIFY, 132);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* the guest's mfence pairs with this */
}

typedef struct {
    int doorbell, control, event, rx_ready, tx_done, timeout_ms;
    uint64_t max_frames;
} serve_fds;

/* Moves frames until stop() or a NIC event ("event"), idle for timeout_ms ("timeout"),
 * max_frames moved ("batch"), a reason of the port's, or a ring error ("error"). */
static const char *serve_loop(serve_ctx *s, serve_port *port, const serve_fds *f)
{
    uint64_t total = 0;
    for (;;) {
        long tx = serve_tx(s, port, 64);
        if (tx < 0)
            return "error";
        long received_before = s->received;
        long rx = port->rx(port, s, 64);
        if (rx < 0)
            return "error";
        serve_rx_publish(s);
        if (s->received != received_before)
            eventfd_signal(f->rx_ready);
        if (tx > 0)
            eventfd_signal(f->tx_done);
        int worked = 0;
        const char *why = port->pass ? port->pass(port, &worked) : NULL;
        if (why)
            return why;
        total += (uint64_t)(tx + rx);
        int64_t free_slots = serve_rx_free(s);
        if (free_slots < 0)
            return "error";
        int room = free_slots > 0;
        struct pollfd fds[6] = {{f->doorbell, POLLIN, 0}, {f->control, POLLIN, 0}, {f->event, POLLIN, 0}};
        int wait_ms = f->timeout_ms;
        int n_fds = 3 + port->wait_fds(port, fds + 3, room, &wait_ms);
        if (tx + rx || worked) {
            if (total >= f->max_frames)
                return "batch";
            /* Busy: one look at everything (what is readable, and stop() or an event). */
            poll(fds, n_fds, 0);
            if (fds[1].revents || fds[2].revents)
                return "event";
            port->polled(port, fds + 3, n_fds - 3);
            continue;
        }
        /* Idle: ask for doorbells (and for RX buffers when out of them), re-check, sleep. */
        serve_arm(s, 1, room ? 0 : 1);
        uint32_t tx_prod = ring_u32(&s->tx, s->tx.ctrl + RING_TX_PROD);
        uint32_t rx_avail = ring_u32(&s->rx, s->rx.ctrl + RING_RX_AVAIL);
        int busy = (tx_prod != s->tx_cons && !s->tx_blocked) || (!room && rx_avail != s->rx_used);
        int woke = 0;
        if (!busy) {
            int n = poll(fds, n_fds, wait_ms);
            if (fds[0].revents)
                eventfd_drain(f->doorbell);
            if (fds[1].revents || fds[2].revents)
                woke = 1;
            else if (n == 0 && wait_ms == f->timeout_ms)
                woke = -1;                  /* idle for timeout_ms (not a timer of the port's) */
            port->polled(port, fds + 3, n_fds - 3);
        }
        serve_arm(s, 0, 0);
        if (woke == -1)
            return "timeout";
        if (woke)
            return "event";
    }
}

PyObject *serve_rings(serve_port *port, PyObject *args)
{
    PyObject *ram, *dirty;
    unsigned long long ctrl, tx_ring, tx_size, rx_ring, rx_size;
    unsigned int tx_cons, rx_used;
    serve_fds f;
    if (!PyArg_ParseTuple(args, "OOKKKKKIIiiiiiiK", &ram, &dirty, &ctrl, &tx_ring, &tx_size, &rx_ring,
                          &rx_size, &tx_cons, &rx_used, &f.doorbell, &f.control, &f.event, &f.rx_ready,
                          &f.tx_done, &f.timeout_ms, &f.max_frames))
        return NULL;
    serve_ctx s = {.tx_cons = tx_cons, .rx_used = rx_used};
    if (ring_open(&s.tx, ram, dirty, ctrl, tx_ring, tx_size) < 0)
        return NULL;
    if (ring_open(&s.rx, ram, dirty, ctrl, rx_ring, rx_size) < 0) {
        ring_close(&s.tx);
        return NULL;
    }
    const char *why;
    Py_BEGIN_ALLOW_THREADS
    why = serve_loop(&s, port, &f);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (s.failed)
        PyErr_SetString(PyExc_ValueError, s.failed->error);
    else
        result = Py_BuildValue("(IIllllKKs)", s.tx_cons, s.rx_used, s.sent, s.dropped, s.received, s.too_big,
                               s.tx_bytes, s.rx_bytes, why);
    ring_close(&s.tx);
    ring_close(&s.rx);
    return result;
}

/* --- ring_serve_tap: the rings straight to a tap ------------------------------------- */

typedef struct {
    serve_port port;
    int fd;
    int readable;                       /* as the last poll said (1 until it said otherwise) */
    uint8_t scratch[RING_MAX_FRAME];    /* the rest of a frame too big for the guest's buffer */
} tap_port;

static int tap_tx(serve_port *p, serve_ctx *s, const uint8_t *frame, uint32_t len)
{
    if (write(((tap_port *)p)->fd, frame, len) == (ssize_t)len) {
        s->sent++;
        s->tx_bytes += len;
    } else
        s->dropped++;
    return 1;
}

/* Reads frames from `fd` straight into the guest's RX buffers: frames read, or -1.  With
 * `mirror`, each frame the guest gets is also passed to it. */
void serve_note_readable(const struct pollfd *fds, int n, int fd, int *readable)
{
    for (int i = 0; i < n; i++)
        if (fds[i].fd == fd) {
            *readable = fds[i].revents != 0;
            return;
        }
}

long serve_rx_from_fd(serve_ctx *s, int fd, int *readable, long limit, uint8_t *scratch,
                      void (*mirror)(void *ctx, const uint8_t *frame, uint32_t len), void *ctx)
{
    long moved = 0;
    while (*readable && moved < limit) {
        uint8_t *buffer;
        uint32_t capacity;
        int slot = serve_rx_slot(s, &buffer, &capacity);
        if (slot <= 0)
            return slot < 0 ? -1 : moved;
        struct iovec iov[2] = {{buffer, capacity}, {scratch, RING_MAX_FRAME}};
        ssize_t got = readv(fd, iov, 2);
        if (got <= 0) {
            if (got < 0 && errno == EINTR)
                continue;
            *readable = 0;
            return moved;
        }
        moved++;
        serve_rx_commit(s, (uint32_t)got, capacity);
        if (mirror && (uint64_t)got <= capacity)
            mirror(ctx, buffer, (uint32_t)got);
    }
    return moved;
}

static long tap_rx(serve_port *p, serve_ctx *s, long limit)
{
    tap_port *t = (tap_port *)p;
    return serve_rx_from_fd(s, t->fd, &t->readable, limit, t->scratch, NULL, NULL);
}

static void tap_polled(serve_port *p, const struct pollfd *fds, int n)
{
    tap_port *t = (tap_port *)p;
    serve_note_readable(fds, n, t->fd, &t->readable);
}

static int tap_wait_fds(serve_port *p, struct pollfd *fds, int rx_room, int *timeout_ms)
{
    if (!rx_room)
        return 0;
    fds[0] = (struct pollfd){((tap_port *)p)->fd, POLLIN, 0};
    return 1;
}

PyObject *ring_serve_tap(PyObject *self, PyObject *args)
{
    Py_ssize_t n = PyTuple_Size(args);
    if (n < 0)
        return NULL;
    if (n != 17) {
        PyErr_Format(PyExc_TypeError, "ring_serve_tap takes 17 arguments (%zd given)", n);
        return NULL;
    }
    tap_port *port = PyMem_RawMalloc(sizeof *port);
    if (!port)
        return PyErr_NoMemory();
    *port = (tap_port){.port = {tap_tx, tap_rx, NULL, tap_wait_fds, tap_polled}, .readable = 1};
    port->fd = (int)PyLong_AsLong(PyTuple_GET_ITEM(args, 9));
    PyObject *rest = NULL, *result = NULL;
    if (!PyErr_Occurred()) {
        /* serve_rings' arguments are ring_serve_tap's without the tap (argument 9) */
        PyObject *before = PyTuple_GetSlice(args, 0, 9), *after = PyTuple_GetSlice(args, 10, n);
        if (before && after)
            rest = PySequence_Concat(before, after);
        Py_XDECREF(before);
        Py_XDECREF(after);
    }
    if (rest)
        result = serve_rings(&port->port, rest);
    Py_XDECREF(rest);
    PyMem_RawFree(port);
    return result;
}
