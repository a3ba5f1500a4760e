/* read_files: a slice of files read beneath a root, links refused anywhere on the path, each
 * hashed (sha256) and scanned (text_flags) while its bytes are in cache. See reading.py. */

#include <errno.h>
#include <fcntl.h>
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

#include "native.h"

enum { OPEN_FAILED = 0, NOT_REGULAR = 1, REGULAR = 2, READ_FAILED = 3 };
#define FILE_FLAGS (O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC)
#define DIR_FLAGS (O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
#define PROBE_BYTES 8192

typedef struct {
    int err, kind, hashed, flags; /* flags: text_flags_of's, -1 when not scanned */
    long long size;
    char *buf, *beyond;
    Py_ssize_t len, beyond_len;
    unsigned char sha256[32];
} entry;

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

/* read_files(root_fd, paths, probe, max_file_bytes, budget, line_limit, walk=False) -> list of
 * (errno, kind, size, data, sha256, flags, beyond) for the first paths whose data add up to
 * `budget` bytes (at least one); flags and beyond: text_flags of the data read, None when none
 * was. `walk`: open one directory at a time even where openat2 works (for the tests).
 * See reading.py. */
PyObject *read_files(PyObject *self, PyObject *args)
{
    int root;
    PyObject *paths;
    Py_buffer probe;
    long long max_bytes, budget;
    Py_ssize_t line_limit;
    int walk = 0;
    if (!PyArg_ParseTuple(args, "iO!y*LLn|p:read_files", &root, &PyList_Type, &paths, &probe, &max_bytes, &budget,
                          &line_limit, &walk))
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
    if (!evp_digest) /* looked up again while not found: hashlib may load it later */
        find_crypto();
    long long total = 0, limit = max_bytes + 1;
    Py_BEGIN_ALLOW_THREADS
    for (; count < n && (count == 0 || total < budget); count++) {
        entry *e = &entries[count];
        e->flags = -1;
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
                if (e->buf)
                    text_flags_of((const unsigned char *)e->buf, (size_t)e->len, line_limit, &e->flags, &e->beyond,
                                  &e->beyond_len);
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
        PyObject *flags_of = e->flags >= 0 ? PyLong_FromLong(e->flags) : (Py_INCREF(Py_None), Py_None);
        PyObject *beyond = e->beyond ? PyBytes_FromStringAndSize(e->beyond, e->beyond_len)
                                     : (Py_INCREF(Py_None), Py_None);
        PyObject *item = data && digest && flags_of && beyond
                             ? Py_BuildValue("iiLOOOO", e->err, e->kind, e->size, data, digest, flags_of, beyond)
                             : NULL;
        Py_XDECREF(data);
        Py_XDECREF(digest);
        Py_XDECREF(flags_of);
        Py_XDECREF(beyond);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    if (entries)
        for (Py_ssize_t i = 0; i < n; i++) {
            free(entries[i].buf);
            free(entries[i].beyond);
        }
    PyMem_Free(entries);
    PyMem_Free(names);
    Py_XDECREF(held);
    PyBuffer_Release(&probe);
    return result;
}
