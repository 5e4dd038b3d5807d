/*
 * The host side of the guest's NIC rings in C (docs/guest-abi.md, "NIC rings"; the
 * contracts are in native/reference.py).  rings.c has the ring accessors, the Python
 * functions ring_tx_pop/ring_rx_push/ring_arm/ring_serve_tap, and serve_rings(): the NIC
 * thread's loop without the GIL, which moves frames between the rings and a serve_port,
 * the thing behind them: a tap (ring_serve_tap) or the COLO datapath (colo_path.c).
 */
#ifndef COLO_RINGS_H
#define COLO_RINGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <poll.h>
#include <stdint.h>

#define RING_TX_PROD 0
#define RING_TX_CONS 64
#define RING_TX_NOTIFY 68
#define RING_RX_AVAIL 128
#define RING_RX_USED 192
#define RING_RX_NOTIFY 196
#define RING_CTRL_SIZE 256
#define RING_DESC_SIZE 16
#define RING_MAX_FRAME 65536

typedef struct {
    Py_buffer ram, dirty;
    uint8_t *mem, *bits;
    uint64_t size_bytes, ctrl, ring;
    uint32_t slots;
    char error[200];
} ring_ctx;

/* A serve loop's two rings (they share RAM and the bitmap), the host's indexes and counters. */
typedef struct {
    ring_ctx tx, rx;
    uint32_t tx_cons, rx_used;
    long sent, dropped, received, too_big;
    unsigned long long tx_bytes, rx_bytes;
    ring_ctx *failed;           /* the ring the guest got wrong (its error says how) */
    int tx_blocked;             /* the port had no room for a TX frame on the last pass */
    uint64_t slot_at, slot_addr;    /* the RX slot serve_rx_slot gave */
    uint32_t placed;            /* RX frames committed since the last publish */
} serve_ctx;

/* What is behind the rings.  Every call comes from the serving thread, without the GIL. */
typedef struct serve_port serve_port;
struct serve_port {
    /* A frame the guest sent: 1 taken (the port counts s->sent or s->dropped), 0 no room
     * now (it stays in the ring, and the port's wait_fds wake the loop when there is). */
    int (*tx)(serve_port *p, serve_ctx *s, const uint8_t *frame, uint32_t len);
    /* Frames for the guest into its free RX slots (serve_rx_slot, serve_rx_commit): frames
     * moved (too big ones included), -1 on a ring error. */
    long (*rx)(serve_port *p, serve_ctx *s, long limit);
    /* Work of the port's own (sockets, timers): sets *worked when it did some; returns a
     * reason to hand back to Python now ("checkpoint", "lost"), or NULL.  May be NULL. */
    const char *(*pass)(serve_port *p, int *worked);
    /* Before each poll: up to 3 pollfds of its own, given whether the RX ring has room;
     * lowers *timeout_ms to its next timer.  Returns how many it filled. */
    int (*wait_fds)(serve_port *p, struct pollfd *fds, int rx_room, int *timeout_ms);
    /* After each poll, those pollfds with their revents: the port reads only what poll
     * said is readable (no read that only finds EAGAIN), until a read comes up short. */
    void (*polled)(serve_port *p, const struct pollfd *fds, int n);
};

void mark_pages(uint8_t *bits, uint64_t gpa, uint64_t len);

/* The next free RX slot's buffer (1), none free (0), or a bad descriptor (-1, s->failed set). */
int serve_rx_slot(serve_ctx *s, uint8_t **buffer, uint32_t *capacity);
/* Publish `len` bytes written into the slot serve_rx_slot gave (len > capacity: too big, dropped). */
void serve_rx_commit(serve_ctx *s, uint32_t len, uint32_t capacity);
/* After a batch of commits: the guest sees them. */
void serve_rx_publish(serve_ctx *s);

/* Reads frames from `fd` (a tap: one frame per read) straight into the guest's RX buffers:
 * frames read (too big ones included), or -1 (s->failed); *readable becomes 0 when a read
 * found nothing.  `scratch` takes the rest of a frame too big for its buffer
 * (RING_MAX_FRAME bytes).  With `mirror`, every frame the guest gets is also passed to it. */
long serve_rx_from_fd(serve_ctx *s, int fd, int *readable, long limit, uint8_t *scratch,
                      void (*mirror)(void *ctx, const uint8_t *frame, uint32_t len), void *ctx);

/* For a port's polled(): *readable as poll said for `fd`; left as it is when `fd` was not
 * among `fds` (not asked for this time). */
void serve_note_readable(const struct pollfd *fds, int n, int fd, int *readable);

/* serve_rings(port, args): parses ring_serve_tap's arguments (without the tap), runs the loop
 * over `port`, returns ring_serve_tap's tuple; ValueError on a ring the guest got wrong. */
PyObject *serve_rings(serve_port *port, PyObject *args);

PyObject *ring_tx_pop(PyObject *self, PyObject *args);
PyObject *ring_rx_push(PyObject *self, PyObject *args);
PyObject *ring_arm(PyObject *self, PyObject *args);
PyObject *ring_serve_tap(PyObject *self, PyObject *args);

#endif
