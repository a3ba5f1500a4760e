/* Sink: the corpus written (writev), hashed (sha256) and its bytes counted, a batch of pieces per
 * call and without the GIL. One thread at a time per Sink. See streams.py. */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include "native.h"

typedef struct {
    PyObject_HEAD
    int fd; /* -1: hash and count only (inspect) */
    void *ctx;
    long long size;
} Sink;

static int sink_init(Sink *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:Sink", kwlist, &self->fd))
        return -1;
    if (!evp_digest) /* looked up again while not found: hashlib may load it later */
        find_crypto();
    if (self->ctx == NULL) {
        if (!ctx_new || !ctx_free || !ctx_copy || !digest_init || !digest_update || !digest_final
            || !(self->ctx = ctx_new())) {
            PyErr_SetString(PyExc_RuntimeError, "no sha256 in a loaded libcrypto");
            return -1;
        }
    }
    if (digest_init(self->ctx, evp_sha256, NULL) != 1) {
        PyErr_SetString(PyExc_RuntimeError, "EVP_DigestInit_ex failed");
        return -1;
    }
    self->size = 0;
    return 0;
}

static void sink_dealloc(Sink *self)
{
    if (self->ctx)
        ctx_free(self->ctx);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

#define SINK_IOV 512

/* Write all of iov[0..n), advancing through short writes; 0, or an errno. */
static int write_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        ssize_t got = writev(fd, iov, n);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (got == 0) /* no progress: never loop on it */
            return EIO;
        while (n > 0 && (size_t)got >= iov->iov_len) {
            got -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + got;
            iov->iov_len -= (size_t)got;
        }
    }
    return 0;
}

/* Sink.write(pieces, counts): each bytes-like piece of the list, in order, hashed, its byte
 * values added to `counts` (256 int64, as count_bytes) and written to fd (writev). */
static PyObject *sink_write(Sink *self, PyObject *args)
{
    PyObject *pieces;
    Py_buffer counts;
    if (!PyArg_ParseTuple(args, "O!w*:write", &PyList_Type, &pieces, &counts))
        return NULL;
    if (counts.len != 256 * (Py_ssize_t)sizeof(int64_t) || counts.itemsize != sizeof(int64_t)) {
        PyBuffer_Release(&counts);
        PyErr_SetString(PyExc_ValueError, "counts must be 256 64-bit integers");
        return NULL;
    }
    if (!self->ctx) {
        PyBuffer_Release(&counts);
        PyErr_SetString(PyExc_RuntimeError, "Sink.__init__ was not called");
        return NULL;
    }
    /* A tuple: a piece's buffer export must not be able to change the list under us. */
    PyObject *held = PyList_AsTuple(pieces);
    Py_ssize_t n = held ? PyTuple_GET_SIZE(held) : 0, got = 0;
    Py_buffer *views = held ? PyMem_Calloc((size_t)(n ? n : 1), sizeof *views) : NULL;
    if (!views) {
        Py_XDECREF(held);
        PyBuffer_Release(&counts);
        return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    for (; got < n; got++)
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(held, got), &views[got], PyBUF_SIMPLE) < 0)
            break;
    int err = 0, hash_failed = 0;
    if (got == n) {
        uint32_t (*t)[256] = calloc(4, sizeof *t);
        struct iovec iov[SINK_IOV];
        if (!t)
            err = ENOMEM;
        Py_BEGIN_ALLOW_THREADS
        int k = 0;
        long long counted = 0;
        for (Py_ssize_t i = 0; !err && i < n; i++) {
            const unsigned char *p = views[i].buf;
            Py_ssize_t len = views[i].len;
            if (len == 0)
                continue;
            if (digest_update(self->ctx, p, (size_t)len) != 1)
                hash_failed = 1;
            /* uint32 tables, added up before they could reach 2^32 (blocks of 2^30 at most) */
            for (Py_ssize_t at = 0; at < len; at += (Py_ssize_t)1 << 30) {
                Py_ssize_t block = len - at < ((Py_ssize_t)1 << 30) ? len - at : ((Py_ssize_t)1 << 30);
                if (counted >= ((long long)1 << 31)) {
                    add_counts(counts.buf, t);
                    counted = 0;
                }
                count_into(p + at, block, t);
                counted += block;
            }
            self->size += len;
            if (self->fd >= 0) {
                iov[k].iov_base = (void *)p;
                iov[k].iov_len = (size_t)len;
                if (++k == SINK_IOV) {
                    err = write_all(self->fd, iov, k);
                    k = 0;
                }
            }
        }
        if (!err && k > 0)
            err = write_all(self->fd, iov, k);
        if (t) {
            add_counts(counts.buf, t);
            free(t);
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    Py_DECREF(held);
    PyBuffer_Release(&counts);
    if (got < n)
        return NULL;
    if (err == ENOMEM)
        return PyErr_NoMemory();
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (hash_failed) {
        PyErr_SetString(PyExc_RuntimeError, "EVP_DigestUpdate failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Sink.hexdigest(): the sha256 of everything written so far. */
static PyObject *sink_hexdigest(Sink *self, PyObject *unused)
{
    if (!self->ctx) {
        PyErr_SetString(PyExc_RuntimeError, "Sink.__init__ was not called");
        return NULL;
    }
    unsigned char md[32];
    unsigned int len = 0;
    char hex[65];
    void *copy = ctx_new();
    int ok = copy && ctx_copy(copy, self->ctx) == 1 && digest_final(copy, md, &len) == 1 && len == 32;
    if (copy)
        ctx_free(copy);
    if (!ok) {
        PyErr_SetString(PyExc_RuntimeError, "EVP_DigestFinal_ex failed");
        return NULL;
    }
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return PyUnicode_FromStringAndSize(hex, 64);
}

static PyObject *sink_size(Sink *self, void *closure)
{
    return PyLong_FromLongLong(self->size);
}

static PyMethodDef sink_methods[] = {
    {"write", (PyCFunction)sink_write, METH_VARARGS,
     "write(pieces, counts): hash, count and write a list of bytes-like pieces, in order."},
    {"hexdigest", (PyCFunction)sink_hexdigest, METH_NOARGS, "hexdigest(): sha256 of all written so far."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sink_getset[] = {
    {"size", (getter)sink_size, NULL, "bytes written so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject SinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "workers.corpus._native.Sink",
    .tp_doc = "Sink(fd): writes to fd (-1: nowhere), hashing (sha256) and counting bytes on the way.",
    .tp_basicsize = sizeof(Sink),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sink_init,
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_methods = sink_methods,
    .tp_getset = sink_getset,
};
