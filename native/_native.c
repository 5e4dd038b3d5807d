/*
 * Hot paths of the migration engine, in C.  Every function here has a
 * pure-Python twin in native/reference.py with the same contract; native/__init__.py
 * picks one at import (COLO_NATIVE=0 forces the reference).  The GIL is
 * released around every scan so vCPU and transfer threads keep running.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int page_is_zero(const uint8_t *p, Py_ssize_t len)
{
    const uint64_t *w = (const uint64_t *)p;
    Py_ssize_t words = len / 8;
    uint64_t acc = 0;
    for (Py_ssize_t i = 0; i < words; i += 8) {
        Py_ssize_t end = i + 8 < words ? i + 8 : words;
        for (Py_ssize_t j = i; j < end; j++)
            acc |= w[j];
        if (acc)
            return 0;
    }
    for (Py_ssize_t i = words * 8; i < len; i++)
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

/* zero_pages(buf, page_size) -> bytes, one byte per page: 1 when the page is all zero. */
static PyObject *zero_pages(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &page_size))
        return NULL;
    if (check_pages(&buf, page_size) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_ssize_t pages = buf.len / page_size;
    PyObject *out = PyBytes_FromStringAndSize(NULL, pages);
    if (out) {
        uint8_t *flags = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *base = buf.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < pages; i++)
            flags[i] = (uint8_t)page_is_zero(base + i * page_size, page_size);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&buf);
    return out;
}

/* changed_pages(buf, shadow, page_size) -> bytes, one byte per page: 1 when the page differs. */
static PyObject *changed_pages(PyObject *self, PyObject *args)
{
    Py_buffer buf, shadow;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "y*y*n", &buf, &shadow, &page_size))
        return NULL;
    PyObject *out = NULL;
    if (buf.len != shadow.len) {
        PyErr_SetString(PyExc_ValueError, "buffer and shadow differ in length");
    } else if (check_pages(&buf, page_size) == 0) {
        Py_ssize_t pages = buf.len / page_size;
        out = PyBytes_FromStringAndSize(NULL, pages);
        if (out) {
            uint8_t *flags = (uint8_t *)PyBytes_AS_STRING(out);
            const uint8_t *a = buf.buf, *b = shadow.buf;
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t i = 0; i < pages; i++)
                flags[i] = memcmp(a + i * page_size, b + i * page_size, page_size) != 0;
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&shadow);
    return out;
}

static PyMethodDef methods[] = {
    {"zero_pages", zero_pages, METH_VARARGS, "One byte per page: 1 when the page is all zero."},
    {"changed_pages", changed_pages, METH_VARARGS, "One byte per page: 1 when buf and shadow differ."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
