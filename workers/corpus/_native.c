/* The corpus builder's byte work, in C and mostly without the GIL (setup.py builds it, optional):
 * - count_bytes, has_long_line, text_flags: scans of corpus text (textscan.py has them in Python);
 * - read_files: a slice of files read beneath a root, links refused anywhere on the path, each
 *   hashed (sha256) and scanned (text_flags) while its bytes are in cache (reading.py);
 * - Sink: the corpus written, hashed and its bytes counted, a batch per call (streams.py).
 * The tests hold each to the pure-Python code it stands in for (tests/test_corpus_native.py). */

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
#include <sys/uio.h>
#include <unistd.h>
#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/openat2.h>)
#include <linux/openat2.h> /* Linux 5.6+ headers; without them, one directory at a time */
#define HAVE_OPENAT2 1
#endif
#endif

/* What textscan.native_module expects: a module built from older sources (an in-place build not
 * redone) is not used. Bump it with every change of the functions' signatures or results. */
#define API_VERSION 2

#define GIL_FREE_BYTES 65536 /* below this, releasing the GIL costs more than it lets run */

static void count_into(const unsigned char *p, Py_ssize_t n, uint32_t t[4][256])
{
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        t[0][p[i]]++;
        t[1][p[i + 1]]++;
        t[2][p[i + 2]]++;
        t[3][p[i + 3]]++;
    }
    for (; i < n; i++)
        t[0][p[i]]++;
}

/* out[b] += the four tables' counts of b; the tables are zeroed */
static void add_counts(int64_t *out, uint32_t t[4][256])
{
    for (int b = 0; b < 256; b++) {
        out[b] += (int64_t)t[0][b] + t[1][b] + t[2][b] + t[3][b];
        t[0][b] = t[1][b] = t[2][b] = t[3][b] = 0;
    }
}

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
    /* Four tables: consecutive equal bytes (runs of spaces) do not wait on one counter. */
    uint32_t t[4][256];
    memset(t, 0, sizeof t);
    PyThreadState *saved = n >= GIL_FREE_BYTES ? PyEval_SaveThread() : NULL;
    while (n > 0) {
        /* uint32 tables cannot overflow within a block of under 2^32 bytes. */
        Py_ssize_t block = n < ((Py_ssize_t)1 << 30) ? n : ((Py_ssize_t)1 << 30);
        count_into(p, block, t);
        add_counts(counts.buf, t);
        p += block;
        n -= block;
    }
    if (saved)
        PyEval_RestoreThread(saved);
    PyBuffer_Release(&data);
    PyBuffer_Release(&counts);
    Py_RETURN_NONE;
}

/* Whether a line of s[0..n) (split at '\n') is longer than `limit` bytes: jumps to the last
 * newline within each window of limit + 1 bytes. */
static int long_line(const char *pos, Py_ssize_t n, Py_ssize_t limit)
{
    const char *end = pos + n;
    while (end - pos > limit) {
        Py_ssize_t i = limit; /* the window is pos[0] .. pos[limit] */
        while (i >= 0 && pos[i] != '\n')
            i--;
        if (i < 0)
            return 1;
        pos += i + 1;
    }
    return 0;
}

/* has_long_line(data, limit): True if some line of `data` (split at b"\n") is longer than
 * `limit` bytes. */
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
    int found = long_line(data.buf, data.len, limit);
    PyBuffer_Release(&data);
    return PyBool_FromLong(found);
}


/* ---- what the judging asks of a file's bytes (textscan.py: py_text_flags says it in Python) ---- */

enum { F_NUL = 1, F_ASCII = 2, F_UTF8 = 4, F_BOM = 8, F_CR = 16, F_LONG = 32, F_SPACE = 64 };
#define HIGH_BITS 0x8080808080808080ULL

static int all_ascii(const unsigned char *s, size_t n)
{
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, s + i, sizeof w);
        if ((w[0] | w[1] | w[2] | w[3]) & HIGH_BITS)
            return 0;
    }
    for (; i < n; i++)
        if (s[i] & 0x80)
            return 0;
    return 1;
}

/* Valid UTF-8 as Python's strict decoder says it: no overlong forms, surrogates or code
 * points past U+10FFFF. */
static int valid_utf8(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & HIGH_BITS)) {
                i += 8;
                continue;
            }
        }
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (n - i < 3 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80
                || (c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] >= 0xA0))
                return 0;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (n - i < 4 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80
                || (c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] >= 0x90))
                return 0;
            i += 4;
        } else {
            return 0;
        }
    }
    return 1;
}

static int all_space(const unsigned char *s, size_t n) /* bytes.isspace() */
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && (s[i] < '\t' || s[i] > '\r'))
            return 0;
    return n > 0;
}

/* The flags of s[0..n); for valid UTF-8 that is not all ASCII, its bytes past 0x7F in order
 * (malloc'd into *beyond; NULL with *flags = -1 when that fails). `limit` < 0: no F_LONG. */
static void text_flags_of(const unsigned char *s, size_t n, Py_ssize_t limit, int *flags, char **beyond,
                          Py_ssize_t *beyond_len)
{
    int f = 0;
    *beyond = NULL;
    *beyond_len = 0;
    if (memchr(s, 0, n))
        f |= F_NUL;
    if (all_ascii(s, n))
        f |= F_ASCII | F_UTF8;
    else if (valid_utf8(s, n))
        f |= F_UTF8;
    if (n >= 3 && s[0] == 0xEF && s[1] == 0xBB && s[2] == 0xBF)
        f |= F_BOM;
    if (memchr(s, '\r', n))
        f |= F_CR;
    if (limit >= 0 && long_line((const char *)s, (Py_ssize_t)n, limit))
        f |= F_LONG;
    if (all_space(s, n))
        f |= F_SPACE;
    if ((f & F_UTF8) && !(f & F_ASCII)) {
        size_t high = 0;
        for (size_t i = 0; i < n; i++)
            high += s[i] >> 7;
        char *out = malloc(high ? high : 1);
        if (!out) {
            *flags = -1;
            return;
        }
        for (size_t i = 0, k = 0; i < n; i++)
            if (s[i] & 0x80)
                out[k++] = (char)s[i];
        *beyond = out;
        *beyond_len = (Py_ssize_t)high;
    }
    *flags = f;
}

/* text_flags(data, line_limit) -> (flags, beyond): what read_files tells of each file it reads. */
static PyObject *text_flags(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*n:text_flags", &data, &limit))
        return NULL;
    int flags;
    char *beyond;
    Py_ssize_t beyond_len;
    text_flags_of(data.buf, (size_t)data.len, limit, &flags, &beyond, &beyond_len);
    PyBuffer_Release(&data);
    if (flags < 0)
        return PyErr_NoMemory();
    PyObject *result = beyond ? Py_BuildValue("iy#", flags, beyond, beyond_len) : Py_BuildValue("iO", flags, Py_None);
    free(beyond);
    return result;
}

/* ---- reading files beneath a root, links refused anywhere on the path ---- */

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

/* sha256 from the libcrypto that Python's hashlib has loaded already (RTLD_NOLOAD: never a
 * second copy). None found: read_files returns no digests and the caller uses hashlib. */
typedef const void *(*md_fn)(void);
typedef int (*digest_fn)(const void *, size_t, unsigned char *, unsigned int *, const void *, void *);
static digest_fn evp_digest;
static const void *evp_sha256;
/* Incremental hashing, for Sink (EVP_MD_CTX is opaque: only pointers to it). */
static void *(*ctx_new)(void);
static void (*ctx_free)(void *);
static int (*ctx_copy)(void *, const void *);
static int (*digest_init)(void *, const void *, void *);
static int (*digest_update)(void *, const void *, size_t);
static int (*digest_final)(void *, unsigned char *, unsigned int *);

static void find_crypto(void)
{
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib", "libcrypto.so", NULL};
    for (int i = 0; names[i]; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
        if (!lib)
            continue;
        digest_fn digest = (digest_fn)dlsym(lib, "EVP_Digest");
        md_fn sha256 = (md_fn)dlsym(lib, "EVP_sha256");
        if (digest && sha256 && (evp_sha256 = sha256())) {
            evp_digest = digest;
            *(void **)&ctx_new = dlsym(lib, "EVP_MD_CTX_new");
            *(void **)&ctx_free = dlsym(lib, "EVP_MD_CTX_free");
            *(void **)&ctx_copy = dlsym(lib, "EVP_MD_CTX_copy_ex");
            *(void **)&digest_init = dlsym(lib, "EVP_DigestInit_ex");
            *(void **)&digest_update = dlsym(lib, "EVP_DigestUpdate");
            *(void **)&digest_final = dlsym(lib, "EVP_DigestFinal_ex");
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

/* read_files(root_fd, paths, probe, max_file_bytes, budget, line_limit, walk=False) -> list of
 * (errno, kind, size, data, sha256, flags, beyond) for the first paths whose data add up to
 * `budget` bytes (at least one); flags and beyond: text_flags of the data read, None when none
 * was. `walk`: open one directory at a time even where openat2 works (for the tests).
 * See reading.py. */
static PyObject *read_files(PyObject *self, PyObject *args)
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

/* ---- Sink: the corpus written, hashed and its bytes counted, in one call without the GIL ---- */

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

static PyTypeObject SinkType = {
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

static PyMethodDef methods[] = {
    {"read_files", read_files, METH_VARARGS,
     "read_files(root_fd, paths, probe, max_file_bytes, budget, line_limit): read files beneath root_fd."},
    {"count_bytes", count_bytes, METH_VARARGS,
     "count_bytes(data, counts): add the count of each byte value in data to counts (256 int64)."},
    {"has_long_line", has_long_line, METH_VARARGS,
     "has_long_line(data, limit): True if a line of data is longer than limit bytes."},
    {"text_flags", text_flags, METH_VARARGS,
     "text_flags(data, line_limit) -> (flags, beyond): NUL, ASCII, UTF-8, BOM, CR, long line, space only."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "The corpus builder's byte work in C (see textscan.py, reading.py, streams.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    if (PyType_Ready(&SinkType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddObjectRef(m, "Sink", (PyObject *)&SinkType) < 0
              || PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0))
        Py_CLEAR(m);
    return m;
}
