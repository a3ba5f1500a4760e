/* The two scans of corpus text that cost most in Python: a byte histogram and the
 * longest-line check. workers/corpus/textscan.py holds the pure-Python equivalents, used when
 * this module was not compiled, and the tests hold both to the same answers. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h> /* Linux 5.6+ headers; without them, one directory at a time */
#define HAVE_OPENAT2 1
#endif
#endif

#define GIL_FREE_BYTES 65536 /* below this, releasing the GIL costs more than it lets run */

/* count_bytes(data, counts): add the number of times each byte value occurs in `data` to
 * `counts`, a writable buffer of 256 signed 64-bit integers (array('q') or an int64 array). */
static PyObject *count_bytes(PyObject *self, PyObject *args)
{
    Py_buffer data, counts;
    if (!PyArg_ParseTuple(args, "y*w*:count_bytes", &data, &counts))
        return NULL;
    if (counts.len != 256 * (Py_ssize_t)sizeof(int64_t) || counts.itemsize != sizeof(int64_t)) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&counts);
        PyErr_SetString(PyExc_ValueError, "counts must be 256 64-bit integers");
        return NULL;
    }
    const unsigned char *p = data.buf;
    Py_ssize_t n = data.len;
    int64_t *out = counts.buf;
    /* Four tables: consecutive equal bytes (runs of spaces) do not wait on one counter. */
    uint32_t t[4][256];
    memset(t, 0, sizeof t);
    PyThreadState *saved = n >= GIL_FREE_BYTES ? PyEval_SaveThread() : NULL;
    while (n > 0) {
        /* uint32 tables cannot overflow within a block of under 2^32 bytes. */
        Py_ssize_t block = n < ((Py_ssize_t)1 << 30) ? n : ((Py_ssize_t)1 << 30), i = 0;
        for (; i + 4 <= block; i += 4) {
            t[0][p[i]]++;
            t[1][p[i + 1]]++;
            t[2][p[i + 2]]++;
            t[3][p[i + 3]]++;
        }
        for (; i < block; i++)
            t[0][p[i]]++;
        for (int b = 0; b < 256; b++) {
            out[b] += (int64_t)t[0][b] + t[1][b] + t[2][b] + t[3][b];
            t[0][b] = t[1][b] = t[2][b] = t[3][b] = 0;
        }
        p += block;
        n -= block;
    }
    if (saved)
        PyEval_RestoreThread(saved);
    PyBuffer_Release(&data);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

/* has_long_line(data, limit): True if some line of `data` (split at b"\n") is longer than
 * `limit` bytes. Jumps to the last newline within each window of limit + 1 bytes. */
static PyObject *has_long_line(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*n:has_long_line", &data, &limit))
        return NULL;
    if (limit < 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "limit must not be negative");
        return NULL;
    }
    const char *pos = data.buf, *end = pos + data.len;
    int found = 0;
    while (end - pos > limit) {
        Py_ssize_t i = limit; /* the window is pos[0] .. pos[limit] */
        while (i >= 0 && pos[i] != '\n')
            i--;
        if (i < 0) {
            found = 1;
            break;
        }
        pos += i + 1;
    }
    PyBuffer_Release(&data);
    return PyBool_FromLong(found);
}


/* ---- reading files beneath a root, links refused anywhere on the path ---- */

enum { OPEN_FAILED = 0, NOT_REGULAR = 1, REGULAR = 2, READ_FAILED = 3 };
#define FILE_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define PROBE_BYTES 8192

typedef struct {
    int err, kind, hashed;
    long long size;
    char *buf;
    Py_ssize_t len;
    unsigned char sha256[32];
} entry;

/* sha256 from the libcrypto that Python's hashlib has loaded already (RTLD_NOLOAD: never a
 * second copy). None found: read_files returns no digests and the caller uses hashlib. */
typedef const void *(*md_fn)(void);
typedef int (*digest_fn)(const void *, size_t, unsigned char *, unsigned int *, const void *, void *);
static digest_fn evp_digest;
static const void *evp_sha256;
static int crypto_looked_up;

static void find_crypto(void)
{
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib", "libcrypto.so", NULL};
    crypto_looked_up = 1;
    for (int i = 0; names[i]; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
        if (!lib)
            continue;
        digest_fn digest = (digest_fn)dlsym(lib, "EVP_Digest");
        md_fn sha256 = (md_fn)dlsym(lib, "EVP_sha256");
        if (digest && sha256 && (evp_sha256 = sha256())) {
            evp_digest = digest;
            return;
        }
    }
}

static void hash_entry(entry *e)
{
    unsigned int n = 0;
    if (evp_digest && e->buf && evp_digest(e->buf, (size_t)e->len, e->sha256, &n, evp_sha256, NULL) == 1 && n == 32)
        e->hashed = 1;
}

static int no_openat2; /* the kernel (or a seccomp filter) refused it once: walk instead */

/* One directory at a time with O_NOFOLLOW, as on a kernel without openat2. */
static int open_walking(int root, const char *path)
{
    char part[4096];
    int dir = root, fd;
    const char *p = path;
    for (;;) {
        const char *slash = strchr(p, '/');
        if (!slash)
            break;
        size_t n = (size_t)(slash - p);
        if (n == 0 || n >= sizeof part) {
            if (dir != root)
                close(dir);
            errno = ENOENT;
            return -1;
        }
        memcpy(part, p, n);
        part[n] = 0;
        int next = openat(dir, part, DIR_FLAGS);
        int saved = errno;
        struct stat st; /* a link there: ELOOP, as openat2 says it (O_DIRECTORY gives ENOTDIR) */
        if (next < 0 && saved == ENOTDIR && fstatat(dir, part, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))
            saved = ELOOP;
        if (dir != root)
            close(dir);
        if (next < 0) {
            errno = saved;
            return -1;
        }
        dir = next;
        p = slash + 1;
    }
    fd = openat(dir, p, FILE_FLAGS);
    int saved = errno;
    if (dir != root)
        close(dir);
    errno = saved;
    return fd;
}

static int open_beneath(int root, const char *path, int walk)
{
#if defined(HAVE_OPENAT2) && defined(SYS_openat2)
    if (!no_openat2 && !walk) {
        struct open_how how;
        memset(&how, 0, sizeof how);
        how.flags = FILE_FLAGS;
        how.resolve = RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
        long fd;
        do
            fd = syscall(SYS_openat2, root, path, &how, sizeof how);
        while (fd < 0 && (errno == EINTR || errno == EAGAIN));
        if (fd >= 0 || (errno != ENOSYS && errno != EPERM))
            return (int)fd;
        no_openat2 = 1;
    }
#endif
    return open_walking(root, path);
}

static ssize_t read_some(int fd, char *buf, size_t n)
{
    ssize_t got;
    do
        got = read(fd, buf, n);
    while (got < 0 && errno == EINTR);
    return got;
}

/* As content._read_limited: at most `limit` bytes; with `probe`, the first PROBE_BYTES only
 * when they hold a NUL byte. */
static void read_entry(int fd, entry *e, long long limit, int probe)
{
    long long size = e->size, ask = size + 1 < limit ? size + 1 : limit;
    if (probe && ask > PROBE_BYTES)
        ask = PROBE_BYTES;
    size_t cap = (size_t)(size + 1 < limit ? size + 1 : limit);
    if (cap < (size_t)ask)
        cap = (size_t)ask;
    e->buf = malloc(cap ? cap : 1);
    if (!e->buf) {
        e->kind = READ_FAILED;
        e->err = ENOMEM;
        return;
    }
    ssize_t got = read_some(fd, e->buf, (size_t)ask);
    if (got < 0)
        goto failed;
    e->len = got;
    if (got < ask || (probe && memchr(e->buf, 0, (size_t)got)))
        return;
    while (e->len < limit) {
        long long want = size + 1 - e->len;
        if (want < 65536)
            want = 65536;
        if (want > limit - e->len)
            want = limit - e->len;
        if ((size_t)(e->len + want) > cap) {
            size_t bigger = (size_t)(e->len + want);
            char *grown = realloc(e->buf, bigger);
            if (!grown) {
                errno = ENOMEM;
                goto failed;
            }
            e->buf = grown;
            cap = bigger;
        }
        got = read_some(fd, e->buf + e->len, (size_t)want);
        if (got < 0)
            goto failed;
        e->len += got;
        if (got < want)
            break;
    }
    return;
failed:
    e->kind = READ_FAILED;
    e->err = errno;
    free(e->buf);
    e->buf = NULL;
    e->len = 0;
}

/* read_files(root_fd, paths, probe, max_file_bytes, budget, walk=False) -> list of
 * (errno, kind, size, data, sha256) for the first paths whose data add up to `budget` bytes (at
 * least one). `walk`: open one directory at a time even where openat2 works (for the tests).
 * See reading.py. */
static PyObject *read_files(PyObject *self, PyObject *args)
{
    int root;
    PyObject *paths;
    Py_buffer probe;
    long long max_bytes, budget;
    int walk = 0;
    if (!PyArg_ParseTuple(args, "iO!y*LL|p:read_files", &root, &PyList_Type, &paths, &probe, &max_bytes, &budget,
                          &walk))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(paths);
    if (probe.len != n || max_bytes < 0) {
        PyBuffer_Release(&probe);
        PyErr_SetString(PyExc_ValueError, "probe must have one byte per path; max_file_bytes >= 0");
        return NULL;
    }
    /* A tuple of the paths: their UTF-8 is used without the GIL, so no one may drop them. */
    PyObject *held = PyList_AsTuple(paths);
    const char **names = PyMem_Calloc((size_t)(n ? n : 1), sizeof *names);
    entry *entries = PyMem_Calloc((size_t)(n ? n : 1), sizeof *entries);
    PyObject *result = NULL;
    if (!held || !names || !entries) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    if (PyTuple_GET_SIZE(held) != n) {
        PyErr_SetString(PyExc_ValueError, "probe must have one byte per path");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *path = PyTuple_GET_ITEM(held, i);
        Py_ssize_t len;
        if (!PyUnicode_Check(path)) {
            PyErr_SetString(PyExc_TypeError, "paths must be str");
            goto done;
        }
        names[i] = PyUnicode_AsUTF8AndSize(path, &len); /* kept alive by `held` */
        if (!names[i])
            goto done;
        if ((size_t)len != strlen(names[i])) {
            PyErr_SetString(PyExc_ValueError, "embedded null character in path");
            goto done;
        }
    }
    const unsigned char *flags = probe.buf;
    Py_ssize_t count = 0;
    if (!crypto_looked_up)
        find_crypto();
    long long total = 0, limit = max_bytes + 1;
    Py_BEGIN_ALLOW_THREADS
    for (; count < n && (count == 0 || total < budget); count++) {
        entry *e = &entries[count];
        int fd = open_beneath(root, names[count], walk);
        if (fd < 0) {
            e->kind = OPEN_FAILED;
            e->err = errno;
            continue;
        }
        struct stat st;
        if (fstat(fd, &st) < 0) {
            e->kind = READ_FAILED;
            e->err = errno;
        } else if (!S_ISREG(st.st_mode)) {
            e->kind = NOT_REGULAR;
        } else {
            e->kind = REGULAR;
            e->size = st.st_size;
            if (st.st_size > 0 && st.st_size <= max_bytes) {
                read_entry(fd, e, limit, flags[count]);
                total += e->len;
                hash_entry(e);
            }
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(count);
    for (Py_ssize_t i = 0; result && i < count; i++) {
        entry *e = &entries[i];
        PyObject *data = e->buf || e->kind == REGULAR ? PyBytes_FromStringAndSize(e->buf ? e->buf : "", e->len)
                                                      : (Py_INCREF(Py_None), Py_None);
        PyObject *digest = e->hashed ? PyBytes_FromStringAndSize((const char *)e->sha256, 32)
                                     : (Py_INCREF(Py_None), Py_None);
        PyObject *item = data && digest ? Py_BuildValue("iiLOO", e->err, e->kind, e->size, data, digest) : NULL;
        Py_XDECREF(data);
        Py_XDECREF(digest);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    if (entries)
        for (Py_ssize_t i = 0; i < n; i++)
            free(entries[i].buf);
    PyMem_Free(entries);
    PyMem_Free(names);
    Py_XDECREF(held);
    PyBuffer_Release(&probe);
    return result;
}

static PyMethodDef methods[] = {
    {"read_files", read_files, METH_VARARGS,
     "read_files(root_fd, paths, probe, max_file_bytes, budget): read files beneath root_fd."},
    {"count_bytes", count_bytes, METH_VARARGS,
     "count_bytes(data, counts): add the count of each byte value in data to counts (256 int64)."},
    {"has_long_line", has_long_line, METH_VARARGS,
     "has_long_line(data, limit): True if a line of data is longer than limit bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "C scans of corpus text (see textscan.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
