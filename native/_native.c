/*
 * Hot paths of the migration engine, in C.  Every function here has a
 * pure-Python twin in native/reference.py with the same contract; native/__init__.py
 * picks one at import (COLO_NATIVE=0 forces the reference).  The GIL is
 * released around every scan so vCPU and transfer threads keep running.
 *
 * Buffers from Python may start at any address, so words are read with
 * memcpy (one plain load on x86-64) rather than through cast pointers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "colo.h"

static PyObject *array_type; /* array.array, for bitmap_pages' result */

/* The 8 bytes at p as a little-endian word: byte k of memory is bits 8k..8k+7. */
static inline uint64_t load_le64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    w = __builtin_bswap64(w);
#endif
    return w;
}

/* Offset of the first nonzero byte of a nonzero little-endian word. */
static inline Py_ssize_t first_nonzero_byte(uint64_t w)
{
    return __builtin_ctzll(w) / 8;
}

/* Nonzero exactly when w has a zero byte; its lowest set bit marks the first one
 * (borrows only ever run towards higher bytes). */
static inline uint64_t zero_byte_mask(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101ULL;
    return (w - ones) & ~w & (ones << 7);
}

static int page_is_zero(const uint8_t *p, Py_ssize_t len)
{
    Py_ssize_t i = 0;
    /* OR 64 bytes at a time: the compiler turns this into vector ORs, and
     * testing once per block keeps the early exit cheap. */
    for (; i + 64 <= len; i += 64) {
        uint64_t acc = 0;
        for (int j = 0; j < 64; j += 8)
            acc |= load_le64(p + i + j);
        if (acc)
            return 0;
    }
    for (; i < len; i++)
        if (p[i])
            return 0;
    return 1;
}

static int check_pages(Py_buffer *buf, Py_ssize_t page_size)
{
    if (page_size <= 0 || buf->len % page_size) {
        PyErr_SetString(PyExc_ValueError, "buffer length must be a multiple of a positive page size");
        return -1;
    }
    return 0;
}

/* ---- page number lists ---------------------------------------------------- */

/* A private copy of a list of page numbers, taken with the GIL held, so that no
 * other thread can change a number between its range check and its use.  A
 * uint64 buffer (array('Q'), a memoryview cast to 'Q', ...) is copied in one go,
 * any other sequence of ints item by item. */
typedef struct {
    int listed; /* 0 for an absent optional list: every page */
    uint64_t *v; /* PyMem_Malloc'ed */
    Py_ssize_t n;
} page_list;

static int is_uint64_format(const Py_buffer *b)
{
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=' || (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && *f == '<'))
        f++;
    return b->itemsize == 8 && (f[0] == 'Q' || f[0] == 'L') && f[1] == '\0';
}

static int page_list_alloc(page_list *pl, Py_ssize_t n)
{
    pl->listed = 1;
    pl->n = n;
    pl->v = PyMem_Malloc(n ? (size_t)n * 8 : 1);
    if (!pl->v) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int page_list_get(PyObject *obj, page_list *pl)
{
    memset(pl, 0, sizeof(*pl));
    if (PyObject_CheckBuffer(obj)) {
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
            /* Not contiguous: still a sequence, read item by item below. */
            if (!PyErr_ExceptionMatches(PyExc_BufferError))
                return -1;
            PyErr_Clear();
        } else {
            int ok = is_uint64_format(&view);
            if (ok && page_list_alloc(pl, view.len / 8) == 0)
                memcpy(pl->v, view.buf, view.len);
            PyBuffer_Release(&view);
            if (ok)
                return pl->v ? 0 : -1;
        }
    }
    /* A tuple, not the list itself: an __index__ method could resize a list. */
    PyObject *seq = PySequence_Tuple(obj);
    if (!seq)
        return -1;
    if (page_list_alloc(pl, PyTuple_GET_SIZE(seq)) < 0) {
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t k = 0; k < pl->n; k++) {
        PyObject *index = PyNumber_Index(PyTuple_GET_ITEM(seq, k));
        if (!index)
            goto fail;
        pl->v[k] = PyLong_AsUnsignedLongLong(index);
        Py_DECREF(index);
        if (PyErr_Occurred()) {
            /* Negative or beyond 64 bits: out of range of any buffer. */
            if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_ValueError, "page number out of range");
            }
            goto fail;
        }
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    PyMem_Free(pl->v);
    pl->v = NULL;
    return -1;
}

static void page_list_release(page_list *pl)
{
    PyMem_Free(pl->v);
}

/* Index of the first page number >= pages, or -1 when all are in range. */
static Py_ssize_t first_bad_page(const page_list *pl, Py_ssize_t pages)
{
    for (Py_ssize_t k = 0; k < pl->n; k++)
        if (pl->v[k] >= (uint64_t)pages)
            return k;
    return -1;
}

static int raise_bad_page(const page_list *pl, Py_ssize_t bad, Py_ssize_t pages)
{
    PyErr_Format(PyExc_ValueError, "page number %llu out of range (%zd pages)",
                 (unsigned long long)pl->v[bad], pages);
    return -1;
}

/* Optional page_numbers argument: NULL or None means every page. */
static int page_list_opt(PyObject *obj, page_list *pl)
{
    if (!obj || obj == Py_None) {
        memset(pl, 0, sizeof(*pl));
        return 0;
    }
    return page_list_get(obj, pl);
}

/* ---- zero and changed page scans ---------------------------------------- */

/* zero_pages(buf, page_size, page_numbers=None) -> bytes, one byte per page
 * (per listed page when page_numbers is given): 1 when the page is all zero. */
static PyObject *zero_pages(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buf", "page_size", "page_numbers", NULL};
    Py_buffer buf;
    Py_ssize_t page_size;
    PyObject *numbers = NULL;
    page_list pl;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*n|O", kwlist, &buf, &page_size, &numbers))
        return NULL;
    if (check_pages(&buf, page_size) < 0 || page_list_opt(numbers, &pl) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_ssize_t pages = buf.len / page_size, bad = -1;
    PyObject *out = NULL;
    if (pl.listed)
        bad = first_bad_page(&pl, pages);
    if (bad >= 0) {
        raise_bad_page(&pl, bad, pages);
    } else if ((out = PyBytes_FromStringAndSize(NULL, pl.listed ? pl.n : pages))) {
        uint8_t *flags = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *base = buf.buf;
        Py_ssize_t n = PyBytes_GET_SIZE(out);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < n; k++) {
            Py_ssize_t page = pl.listed ? (Py_ssize_t)pl.v[k] : k;
            flags[k] = (uint8_t)page_is_zero(base + page * page_size, page_size);
        }
        Py_END_ALLOW_THREADS
    }
    page_list_release(&pl);
    PyBuffer_Release(&buf);
    return out;
}

/* changed_pages(buf, shadow, page_size, page_numbers=None) -> bytes, one byte per
 * page (per listed page when page_numbers is given): 1 when the page differs. */
static PyObject *changed_pages(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buf", "shadow", "page_size", "page_numbers", NULL};
    Py_buffer buf, shadow;
    Py_ssize_t page_size;
    PyObject *numbers = NULL;
    page_list pl = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*n|O", kwlist, &buf, &shadow, &page_size, &numbers))
        return NULL;
    PyObject *out = NULL;
    if (buf.len != shadow.len) {
        PyErr_SetString(PyExc_ValueError, "buffer and shadow differ in length");
    } else if (check_pages(&buf, page_size) == 0 && page_list_opt(numbers, &pl) == 0) {
        Py_ssize_t pages = buf.len / page_size;
        Py_ssize_t bad = pl.listed ? first_bad_page(&pl, pages) : -1;
        if (bad >= 0) {
            raise_bad_page(&pl, bad, pages);
        } else if ((out = PyBytes_FromStringAndSize(NULL, pl.listed ? pl.n : pages))) {
            uint8_t *flags = (uint8_t *)PyBytes_AS_STRING(out);
            const uint8_t *a = buf.buf, *b = shadow.buf;
            Py_ssize_t n = PyBytes_GET_SIZE(out);
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t k = 0; k < n; k++) {
                Py_ssize_t off = (pl.listed ? (Py_ssize_t)pl.v[k] : k) * page_size;
                flags[k] = memcmp(a + off, b + off, page_size) != 0;
            }
            Py_END_ALLOW_THREADS
        }
    }
    page_list_release(&pl);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&shadow);
    return out;
}

/* memcmp_bandwidth_probe(a, b, page_size) -> int: memcmp every page pair and
 * count the differing ones.  Only the benchmark's baseline, hence no Python twin. */
static PyObject *memcmp_bandwidth_probe(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    Py_ssize_t page_size, differing = 0;
    if (!PyArg_ParseTuple(args, "y*y*n", &a, &b, &page_size))
        return NULL;
    PyObject *out = NULL;
    if (a.len != b.len) {
        PyErr_SetString(PyExc_ValueError, "buffers differ in length");
    } else if (check_pages(&a, page_size) == 0) {
        const uint8_t *pa = a.buf, *pb = b.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t off = 0; off < a.len; off += page_size)
            differing += memcmp(pa + off, pb + off, page_size) != 0;
        Py_END_ALLOW_THREADS
        out = PyLong_FromSsize_t(differing);
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

/* ---- XBZRLE (QEMU migration/xbzrle.c) ---------------------------------------
 * encoded = (zrun nzrun)*, zrun = ULEB128 count of equal bytes, nzrun = ULEB128
 * count n > 0 of differing bytes followed by those n bytes of the new page.
 * A trailing run of equal bytes is not encoded; equal pages encode to nothing.
 * Beyond QEMU: any length and alignment, ULEB128s longer than 2 bytes (pages
 * over 16 KiB), and an exact limit (QEMU wants 2 spare bytes before each run,
 * so it may give up on an encoding that would end within 2 bytes of its limit). */

/* End of the run of equal bytes starting at i. */
static Py_ssize_t equal_run_end(const uint8_t *a, const uint8_t *b, Py_ssize_t i, Py_ssize_t len)
{
    /* Skip equal 32-byte blocks first: most of a dirty page is unchanged. */
    for (; i + 32 <= len; i += 32) {
        uint64_t x = 0;
        for (int j = 0; j < 32; j += 8)
            x |= load_le64(a + i + j) ^ load_le64(b + i + j);
        if (x)
            break;
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t x = load_le64(a + i) ^ load_le64(b + i);
        if (x)
            return i + first_nonzero_byte(x);
    }
    while (i < len && a[i] == b[i])
        i++;
    return i;
}

/* End of the run of differing bytes starting at i. */
static Py_ssize_t differ_run_end(const uint8_t *a, const uint8_t *b, Py_ssize_t i, Py_ssize_t len)
{
    for (; i + 8 <= len; i += 8) {
        uint64_t z = zero_byte_mask(load_le64(a + i) ^ load_le64(b + i));
        if (z)
            return i + first_nonzero_byte(z);
    }
    while (i < len && a[i] != b[i])
        i++;
    return i;
}

static int put_uleb128(uint8_t *dst, Py_ssize_t cap, Py_ssize_t *d, size_t v)
{
    do {
        if (*d >= cap)
            return -1;
        dst[(*d)++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v);
    return 0;
}

/* Encoded length, or -1 when it would exceed cap. */
static Py_ssize_t xbzrle_encode_buf(const uint8_t *old, const uint8_t *new, Py_ssize_t len,
                                    uint8_t *dst, Py_ssize_t cap)
{
    Py_ssize_t i = 0, d = 0;
    while (i < len) {
        Py_ssize_t zstart = i;
        i = equal_run_end(old, new, i, len);
        if (i == len)
            break;
        Py_ssize_t nzstart = i;
        i = differ_run_end(old, new, i, len);
        Py_ssize_t nz = i - nzstart;
        if (put_uleb128(dst, cap, &d, (size_t)(nzstart - zstart)) < 0
            || put_uleb128(dst, cap, &d, (size_t)nz) < 0 || nz > cap - d)
            return -1;
        memcpy(dst + d, new + nzstart, nz);
        d += nz;
    }
    return d;
}

/* xbzrle_encode(old, new, limit) -> bytes | None: None when the encoding would
 * be longer than limit bytes (QEMU's overflow), b"" when the pages are equal. */
static PyObject *xbzrle_encode(PyObject *self, PyObject *args)
{
    Py_buffer old, new;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*y*n", &old, &new, &limit))
        return NULL;
    PyObject *out = NULL;
    if (old.len != new.len) {
        PyErr_SetString(PyExc_ValueError, "old and new pages differ in length");
    } else if (limit < 0) {
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
    } else {
        /* A ULEB128 is no longer than the run it counts (bar an empty first zero
         * run), so 2 * len + 1 bounds any encoding and the scratch stays small. */
        Py_ssize_t len = old.len;
        Py_ssize_t cap = limit / 2 <= len ? limit : 2 * len + 1;
        uint8_t *dst = PyMem_Malloc(cap ? cap : 1);
        if (!dst) {
            PyErr_NoMemory();
        } else {
            Py_ssize_t d;
            const uint8_t *po = old.buf, *pn = new.buf;
            Py_BEGIN_ALLOW_THREADS
            d = xbzrle_encode_buf(po, pn, len, dst, cap);
            Py_END_ALLOW_THREADS
            out = d < 0 ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize((char *)dst, d);
            PyMem_Free(dst);
        }
    }
    PyBuffer_Release(&old);
    PyBuffer_Release(&new);
    return out;
}

/* Reads a ULEB128 at src[*i] no larger than max; NULL or what is wrong. */
static const char *get_uleb128(const uint8_t *src, Py_ssize_t slen, Py_ssize_t *i,
                               size_t max, size_t *v)
{
    size_t value = 0;
    for (int shift = 0;; shift += 7) {
        if (*i >= slen)
            return "truncated ULEB128 length";
        if (shift > 56) /* 9 bytes already: no page is that long */
            return "ULEB128 length too long";
        uint8_t byte = src[(*i)++];
        value |= (size_t)(byte & 0x7f) << shift;
        if (value > max)
            return "run past the end of the page";
        if (!(byte & 0x80))
            break;
    }
    *v = value;
    return NULL;
}

/* Applies src to page (len bytes, holding the old page); NULL or what is wrong.
 * Like QEMU, only the first zero run may be empty and no data run may be. */
static const char *xbzrle_decode_buf(const uint8_t *src, Py_ssize_t slen, uint8_t *page, Py_ssize_t len)
{
    Py_ssize_t i = 0, d = 0;
    const char *err;
    while (i < slen) {
        size_t zrun, nzrun;
        int first = i == 0;
        if ((err = get_uleb128(src, slen, &i, (size_t)(len - d), &zrun)))
            return err;
        if (!zrun && !first)
            return "empty zero run";
        d += (Py_ssize_t)zrun;
        if (i == slen)
            return "zero run without a data run";
        if ((err = get_uleb128(src, slen, &i, (size_t)(len - d), &nzrun)))
            return err;
        if (!nzrun)
            return "empty data run";
        if ((Py_ssize_t)nzrun > slen - i)
            return "truncated data run";
        memcpy(page + d, src + i, nzrun);
        d += (Py_ssize_t)nzrun;
        i += (Py_ssize_t)nzrun;
    }
    return NULL;
}

/* xbzrle_decode(encoded, old_page) -> bytes: old_page with encoded applied. */
static PyObject *xbzrle_decode(PyObject *self, PyObject *args)
{
    Py_buffer enc, old;
    if (!PyArg_ParseTuple(args, "y*y*", &enc, &old))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, old.len);
    if (out) {
        const char *err;
        uint8_t *page = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *src = enc.buf, *po = old.buf;
        Py_BEGIN_ALLOW_THREADS
        memcpy(page, po, old.len);
        err = xbzrle_decode_buf(src, enc.len, page, old.len);
        Py_END_ALLOW_THREADS
        if (err) {
            PyErr_Format(PyExc_ValueError, "malformed XBZRLE data: %s", err);
            Py_CLEAR(out);
        }
    }
    PyBuffer_Release(&enc);
    PyBuffer_Release(&old);
    return out;
}

/* ---- dirty bitmaps (KVM layout: bit i of the little-endian words = page i) - */

/* Word w of the bitmap, zero-padded past its end. */
static inline uint64_t bitmap_word(const uint8_t *bm, Py_ssize_t nbytes, Py_ssize_t w)
{
    Py_ssize_t off = w * 8;
    if (off + 8 <= nbytes)
        return load_le64(bm + off);
    uint8_t tail[8] = {0};
    memcpy(tail, bm + off, nbytes - off);
    return load_le64(tail);
}

/* Visits the set bits from bit start on, in order, stopping after max of them;
 * stores them in out unless it is NULL.  Returns how many it visited. */
static Py_ssize_t bitmap_scan(const uint8_t *bm, Py_ssize_t nbytes, Py_ssize_t start,
                              Py_ssize_t max, uint64_t *out)
{
    Py_ssize_t n = 0, nwords = (nbytes + 7) / 8;
    for (Py_ssize_t w = start / 64; w < nwords && n < max; w++) {
        uint64_t x = bitmap_word(bm, nbytes, w);
        if (w == start / 64)
            x &= ~0ULL << (start % 64);
        if (!out) {
            n += __builtin_popcountll(x);
            continue;
        }
        for (; x && n < max; x &= x - 1)
            out[n++] = (uint64_t)w * 64 + __builtin_ctzll(x);
    }
    return n < max ? n : max;
}

/* bitmap_count(bitmap) -> int: how many bits are set. */
static PyObject *bitmap_count(PyObject *self, PyObject *args)
{
    Py_buffer bm;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "y*", &bm))
        return NULL;
    const uint8_t *p = bm.buf;
    Py_BEGIN_ALLOW_THREADS
    n = bitmap_scan(p, bm.len, 0, PY_SSIZE_T_MAX, NULL);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&bm);
    return PyLong_FromSsize_t(n);
}

/* array('Q', 8 zero bytes) * n: an n-entry array to fill in place, its buffer taken in *ab
 * (released by the caller once filled); NULL with an exception set on failure. */
static PyObject *u64_array(Py_ssize_t n, Py_buffer *ab)
{
    PyObject *arr = NULL, *one = PyObject_CallFunction(array_type, "sy#", "Q", "\0\0\0\0\0\0\0\0", (Py_ssize_t)8);
    if (one) {
        arr = PySequence_Repeat(one, n);
        Py_DECREF(one);
    }
    if (arr && PyObject_GetBuffer(arr, ab, PyBUF_WRITABLE) < 0)
        Py_CLEAR(arr);
    return arr;
}

/* bitmap_pages(bitmap, start_page=0, limit=None) -> array('Q'): the set bits
 * from start_page on, ascending, at most limit of them. */
static PyObject *bitmap_pages(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"bitmap", "start_page", "limit", NULL};
    Py_buffer bm;
    Py_ssize_t start = 0, max = PY_SSIZE_T_MAX;
    PyObject *limit = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|nO", kwlist, &bm, &start, &limit))
        return NULL;
    /* A limit beyond Py_ssize_t is no limit. */
    if (limit != Py_None && (max = PyNumber_AsSsize_t(limit, NULL)) == -1 && PyErr_Occurred()) {
        PyBuffer_Release(&bm);
        return NULL;
    }
    if (start < 0 || max < 0) {
        PyErr_SetString(PyExc_ValueError, "start_page and limit must not be negative");
        PyBuffer_Release(&bm);
        return NULL;
    }
    const uint8_t *p = bm.buf;
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = bitmap_scan(p, bm.len, start, max, NULL);
    Py_END_ALLOW_THREADS
    Py_buffer ab;
    PyObject *arr = u64_array(n, &ab);
    if (arr) {
        uint64_t *dst = ab.buf;
        Py_BEGIN_ALLOW_THREADS
        /* n bounds the fill even if the bitmap changed since the count. */
        bitmap_scan(p, bm.len, start, n, dst);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ab);
    }
    PyBuffer_Release(&bm);
    return arr;
}

/* Runs of set bits: fills (first, count) pairs into out (when not NULL), at most max
 * runs; returns how many runs there are (up to max). */
static Py_ssize_t bitmap_run_scan(const uint8_t *p, Py_ssize_t len, Py_ssize_t max, uint64_t *out)
{
    Py_ssize_t runs = 0, bits = len * 8, i = 0;
    while (i < bits && runs < max) {
        /* skip clear bytes quickly, then clear bits */
        while (i < bits && (i & 7) == 0 && p[i >> 3] == 0)
            i += 8;
        while (i < bits && !(p[i >> 3] >> (i & 7) & 1))
            i++;
        if (i >= bits)
            break;
        Py_ssize_t first = i;
        while (i < bits && (i & 7) == 0 && p[i >> 3] == 0xFF)
            i += 8;
        while (i < bits && (p[i >> 3] >> (i & 7) & 1)) {
            i++;
            while (i < bits && (i & 7) == 0 && p[i >> 3] == 0xFF)
                i += 8;
        }
        if (out) {
            out[2 * runs] = (uint64_t)first;
            out[2 * runs + 1] = (uint64_t)(i - first);
        }
        runs++;
    }
    return runs;
}

/* bitmap_runs(bitmap) -> array('Q'): first0, count0, first1, count1, ... for each run of
 * set bits, ascending (the dirty pages as the engine sends them). */
static PyObject *bitmap_runs(PyObject *self, PyObject *args)
{
    Py_buffer bm;
    if (!PyArg_ParseTuple(args, "y*", &bm))
        return NULL;
    const uint8_t *p = bm.buf;
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = bitmap_run_scan(p, bm.len, PY_SSIZE_T_MAX, NULL);
    Py_END_ALLOW_THREADS
    Py_buffer ab;
    PyObject *arr = u64_array(2 * n, &ab);
    if (arr) {
        uint64_t *dst = ab.buf;
        Py_BEGIN_ALLOW_THREADS
        bitmap_run_scan(p, bm.len, n, dst);
        Py_END_ALLOW_THREADS
        PyBuffer_Release(&ab);
    }
    PyBuffer_Release(&bm);
    return arr;
}

/* ---- gather and scatter ------------------------------------------------------ */

/* Shared checks: page size, page numbers in range, other buffer large enough. */
static int check_transfer(Py_buffer *ram, Py_ssize_t page_size, const page_list *pl,
                          Py_buffer *other, const char *too_small)
{
    if (check_pages(ram, page_size) < 0)
        return -1;
    Py_ssize_t pages = ram->len / page_size, bad;
    if (pl->n > other->len / page_size) {
        PyErr_SetString(PyExc_ValueError, too_small);
        return -1;
    }
    Py_BEGIN_ALLOW_THREADS
    bad = first_bad_page(pl, pages);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        return raise_bad_page(pl, bad, pages);
    return 0;
}

/* How a transfer moves page k of the list (page number v[k]): to or from slot k of a
 * packed buffer, or between the same page of two RAM-sized buffers. */
enum transfer { GATHER, SCATTER, SAME_PAGE };

/* The shared part of gather, scatter and copy: take the page list, check it against
 * `ram` (the buffer the page numbers index) and `other`, then move the pages with the
 * GIL released.  Nothing is written unless every page number is valid. */
static PyObject *transfer_pages(Py_buffer *ram, Py_buffer *other, PyObject *numbers, Py_ssize_t page_size,
                                uint8_t *dst, const uint8_t *src, enum transfer how, const char *too_small)
{
    page_list pl;
    PyObject *result = NULL;
    if (page_list_get(numbers, &pl) == 0) {
        if (check_transfer(ram, page_size, &pl, other, too_small) == 0) {
            Py_BEGIN_ALLOW_THREADS
            /* memmove: a packed buffer may be a view of the RAM. */
            for (Py_ssize_t k = 0; k < pl.n; k++) {
                Py_ssize_t page = (Py_ssize_t)pl.v[k] * page_size, slot = k * page_size;
                memmove(dst + (how == GATHER ? slot : page), src + (how == SCATTER ? slot : page), page_size);
            }
            Py_END_ALLOW_THREADS
            result = PyLong_FromSsize_t(pl.n * page_size);
        }
        page_list_release(&pl);
    }
    PyBuffer_Release(ram);
    PyBuffer_Release(other);
    return result;
}

/* gather_pages(ram, page_numbers, page_size, out) -> int: copies the listed pages
 * of ram back to back into out; returns the bytes written. */
static PyObject *gather_pages(PyObject *self, PyObject *args)
{
    Py_buffer ram, out;
    PyObject *numbers;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "y*Onw*", &ram, &numbers, &page_size, &out))
        return NULL;
    return transfer_pages(&ram, &out, numbers, page_size, out.buf, ram.buf, GATHER, "out is too small for the pages");
}

/* scatter_pages(ram, page_numbers, page_size, data) -> int: copies consecutive
 * pages of data into the listed pages of the writable ram; returns the bytes read. */
static PyObject *scatter_pages(PyObject *self, PyObject *args)
{
    Py_buffer ram, data;
    PyObject *numbers;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "w*Ony*", &ram, &numbers, &page_size, &data))
        return NULL;
    return transfer_pages(&ram, &data, numbers, page_size, ram.buf, data.buf, SCATTER,
                          "data is too short for the pages");
}

/* copy_pages(dst, src, page_numbers, page_size) -> int: copies the listed pages of src
 * to the same pages of the writable dst (the COLO cache flushed into guest RAM);
 * returns the bytes copied. */
static PyObject *copy_pages(PyObject *self, PyObject *args)
{
    Py_buffer dst, src;
    PyObject *numbers;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "w*y*On", &dst, &src, &numbers, &page_size))
        return NULL;
    if (dst.len != src.len) {
        PyErr_SetString(PyExc_ValueError, "dst and src differ in size");
        PyBuffer_Release(&dst);
        PyBuffer_Release(&src);
        return NULL;
    }
    return transfer_pages(&dst, &src, numbers, page_size, dst.buf, src.buf, SAME_PAGE,
                          "src is too small for the pages");
}

/* equal_prefix(a, b) -> int: how many leading bytes a and b have in common (at most the
 * shorter length); the COLO comparer's payload check, which also says where they differ.
 * Payloads are at most a packet long, so the GIL is kept. */
static PyObject *equal_prefix(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b))
        return NULL;
    const uint8_t *p = a.buf, *q = b.buf;
    Py_ssize_t n = a.len < b.len ? a.len : b.len, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x = load_le64(p + i) ^ load_le64(q + i);
        if (x) {
            i += first_nonzero_byte(x);
            goto done;
        }
    }
    while (i < n && p[i] == q[i])
        i++;
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyLong_FromSsize_t(i);
}


static inline unsigned be16(const uint8_t *p) { return (unsigned)p[0] << 8 | p[1]; }
static inline unsigned long be32(const uint8_t *p)
{
    return (unsigned long)p[0] << 24 | (unsigned long)p[1] << 16 | (unsigned long)p[2] << 8 | p[3];
}

/* "a.b.c.d" (vfprintf-free: two per frame) */
static PyObject *dotted_quad(const uint8_t *a)
{
    char text[16], *out = text;
    for (int i = 0; i < 4; i++) {
        unsigned v = a[i];
        if (v >= 100)
            *out++ = '0' + v / 100;
        if (v >= 10)
            *out++ = '0' + v / 10 % 10;
        *out++ = '0' + v % 10;
        if (i < 3)
            *out++ = '.';
    }
    return PyUnicode_FromStringAndSize(text, out - text);
}

/* parse_headers(frame) -> tuple | None: reference.parse_headers' tuple for a well-formed
 * IPv4 frame; None for anything else (not IPv4, or malformed), for which the caller asks
 * the reference (it says why).  The COLO comparer and rewriter parse every frame. */
static PyObject *parse_headers(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = b.buf;
    Py_ssize_t n = b.len, off = 12;
    PyObject *result = NULL;
    unsigned long t[8] = {0};
    unsigned kind = 0;
    if (n < 14)
        goto other;
    unsigned ethertype = be16(p + off);
    for (int tags = 0; tags < 2 && (ethertype == 0x8100 || ethertype == 0x88A8); tags++) {
        off += 4;
        if (n < off + 2)
            goto other;
        ethertype = be16(p + off);
    }
    Py_ssize_t ip = off + 2, available = n - ip;
    if (ethertype != 0x0800 || available < 20)
        goto other;
    const uint8_t *h = p + ip;
    Py_ssize_t ihl = (h[0] & 0x0F) * 4, total = be16(h + 2);
    if (h[0] >> 4 != 4 || ihl < 20 || ihl > available || total < ihl || total > available)
        goto other;
    unsigned ident = be16(h + 4), flags_offset = be16(h + 6), protocol = h[9];
    const uint8_t *tp = h + ihl;
    Py_ssize_t room = total - ihl;
    if (!(flags_offset & 0x3FFF)) {
        if (protocol == 6) {
            unsigned header_length = (tp[12] >> 4) * 4;
            if (room < 20 || header_length < 20 || header_length > room)
                goto other;
            kind = 6;
            t[0] = be16(tp); t[1] = be16(tp + 2); t[2] = be32(tp + 4); t[3] = be32(tp + 8);
            t[4] = header_length; t[5] = tp[13]; t[6] = be16(tp + 14); t[7] = be16(tp + 16);
        } else if (protocol == 17) {
            if (room < 8)
                goto other;
            unsigned length = be16(tp + 4);
            if (length < 8 || length > room)
                goto other;
            kind = 17;
            t[0] = be16(tp); t[1] = be16(tp + 2); t[2] = length; t[3] = be16(tp + 6);
        } else if (protocol == 1) {
            if (room < 8)
                goto other;
            kind = 1;
            t[0] = tp[0]; t[1] = tp[1]; t[2] = be16(tp + 2); t[3] = be16(tp + 4); t[4] = be16(tp + 6);
        }
    }
    result = Py_BuildValue("(IniniNNIIIkkkkkkkk)", ethertype, ip, (int)ihl, total, protocol,
                           dotted_quad(h + 12), dotted_quad(h + 16),
                           ident, flags_offset, kind, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]);
    PyBuffer_Release(&b);
    return result;
other:
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

#include "rings.h"
#include "colo.h"

static PyObject *bitmap_mark(PyObject *self, PyObject *args)
{
    Py_buffer bm;
    unsigned long long gpa, length;
    if (!PyArg_ParseTuple(args, "w*KK", &bm, &gpa, &length))
        return NULL;
    if (length && ((gpa + length - 1) >> 12) >= (uint64_t)bm.len * 8) {
        PyBuffer_Release(&bm);
        PyErr_SetString(PyExc_ValueError, "range past the end of the bitmap");
        return NULL;
    }
    if (length)
        mark_pages(bm.buf, gpa, length);
    PyBuffer_Release(&bm);
    Py_RETURN_NONE;
}

static PyObject *bitmap_take(PyObject *self, PyObject *args)
{
    Py_buffer bm;
    if (!PyArg_ParseTuple(args, "w*", &bm))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, bm.len);
    if (out) {
        uint8_t *src = bm.buf, *dst = (uint8_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < bm.len; i++)
            dst[i] = __atomic_exchange_n(&src[i], 0, __ATOMIC_ACQ_REL);
    }
    PyBuffer_Release(&bm);
    return out;
}

static PyMethodDef methods[] = {
    {"zero_pages", (PyCFunction)(void (*)(void))zero_pages, METH_VARARGS | METH_KEYWORDS,
     "One byte per page (or per listed page): 1 when the page is all zero."},
    {"changed_pages", (PyCFunction)(void (*)(void))changed_pages, METH_VARARGS | METH_KEYWORDS,
     "One byte per page (or per listed page): 1 when buf and shadow differ."},
    {"xbzrle_encode", xbzrle_encode, METH_VARARGS,
     "QEMU XBZRLE encoding of new against old; None when longer than limit."},
    {"xbzrle_decode", xbzrle_decode, METH_VARARGS,
     "old_page with an XBZRLE encoding applied; ValueError when malformed."},
    {"bitmap_pages", (PyCFunction)(void (*)(void))bitmap_pages, METH_VARARGS | METH_KEYWORDS,
     "array('Q') of the set bits of a KVM dirty bitmap from start_page, at most limit."},
    {"bitmap_count", bitmap_count, METH_VARARGS, "Number of set bits in a bitmap."},
    {"bitmap_runs", bitmap_runs, METH_VARARGS,
     "array('Q') of first, count pairs, one per run of set bits, ascending."},
    {"gather_pages", gather_pages, METH_VARARGS,
     "Copy the listed pages of ram back to back into out; bytes written."},
    {"scatter_pages", scatter_pages, METH_VARARGS,
     "Copy consecutive pages of data into the listed pages of ram; bytes read."},
    {"copy_pages", copy_pages, METH_VARARGS,
     "Copy the listed pages of src to the same pages of dst; bytes copied."},
    {"equal_prefix", equal_prefix, METH_VARARGS,
     "How many leading bytes a and b have in common (at most the shorter length)."},
    {"parse_headers", parse_headers, METH_O,
     "An IPv4 frame's headers as reference.parse_headers' tuple; None for any other frame."},
    {"ring_tx_pop", ring_tx_pop, METH_VARARGS,
     "Copy up to limit queued TX frames out of guest RAM; (cons, [frames])."},
    {"ring_rx_push", ring_rx_push, METH_VARARGS,
     "Copy frames into the guest's posted RX buffers; (used, taken, too_big)."},
    {"ring_arm", ring_arm, METH_VARARGS,
     "Set the notify flags, fence, read (tx_prod, rx_avail)."},
    {"ring_serve_tap", ring_serve_tap, METH_VARARGS,
     "Move frames between the rings and a tap until an event, a timeout or max_frames."},
    {"bitmap_mark", bitmap_mark, METH_VARARGS, "Set the bits of the pages of [gpa, gpa+length), atomically."},
    {"bitmap_take", bitmap_take, METH_VARARGS, "The bitmap's bytes, each cleared atomically as it is read."},
    {"memcmp_bandwidth_probe", memcmp_bandwidth_probe, METH_VARARGS,
     "Benchmark baseline: memcmp every page pair, return how many differ."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *array_mod = PyImport_ImportModule("array");
    if (!array_mod)
        return NULL;
    array_type = PyObject_GetAttrString(array_mod, "array");
    Py_DECREF(array_mod);
    if (!array_type)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (colo_compare_register(m) < 0 || colo_rewrite_register(m) < 0 || colo_path_register(m) < 0))
        Py_CLEAR(m);
    return m;
}
