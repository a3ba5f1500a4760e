/* Scans of corpus text: byte counts, long lines, and the flags a file's verdict needs.
 * textscan.py has each in Python; tests/test_corpus_native.py holds them to the same answers. */

#include <string.h>

#include "native.h"

void count_into(const unsigned char *p, Py_ssize_t n, uint32_t t[4][256])
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
void add_counts(int64_t *out, uint32_t t[4][256])
{
    for (int b = 0; b < 256; b++) {
        out[b] += (int64_t)t[0][b] + t[1][b] + t[2][b] + t[3][b];
        t[0][b] = t[1][b] = t[2][b] = t[3][b] = 0;
    }
}

/* count_bytes(data, counts): add the number of times each byte value occurs in `data` to
 * `counts`, a writable buffer of 256 signed 64-bit integers (array('q') or an int64 array). */
PyObject *count_bytes(PyObject *self, PyObject *args)
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

/* ---- what the judging asks of a file's bytes (textscan.py: py_text_flags says it in Python) ---- */

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
void text_flags_of(const unsigned char *s, size_t n, Py_ssize_t limit, int *flags, char **beyond,
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
PyObject *text_flags(PyObject *self, PyObject *args)
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
