/* Declarations shared by the C extension's files (see module.c for what it is). Built with
 * -fvisibility=hidden (setup.py): nothing here is visible outside the module but PyInit__native. */

#ifndef CHARFORGE_NATIVE_H
#define CHARFORGE_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* What textscan.native_module expects: a module built from older sources (an in-place build not
 * redone) is not used. Bump it with every change of the functions' signatures or results. */
#define API_VERSION 3

#define GIL_FREE_BYTES 65536 /* below this, releasing the GIL costs more than it lets run */

/* scan.c: byte counts, long lines, text flags */
enum { F_NUL = 1, F_ASCII = 2, F_UTF8 = 4, F_BOM = 8, F_CR = 16, F_LONG = 32, F_SPACE = 64 };
void count_into(const unsigned char *p, Py_ssize_t n, uint32_t t[4][256]);
void add_counts(int64_t *out, uint32_t t[4][256]);
void text_flags_of(const unsigned char *s, size_t n, Py_ssize_t limit, int *flags, char **beyond,
                   Py_ssize_t *beyond_len);
PyObject *count_bytes(PyObject *self, PyObject *args);
PyObject *text_flags(PyObject *self, PyObject *args);

/* crypto.c: sha256 from the libcrypto that Python's hashlib has loaded (NULL when none is) */
typedef const void *(*md_fn)(void);
typedef int (*digest_fn)(const void *, size_t, unsigned char *, unsigned int *, const void *, void *);
extern digest_fn evp_digest;
extern const void *evp_sha256;
extern void *(*ctx_new)(void);
extern void (*ctx_free)(void *);
extern int (*ctx_copy)(void *, const void *);
extern int (*digest_init)(void *, const void *, void *);
extern int (*digest_update)(void *, const void *, size_t);
extern int (*digest_final)(void *, unsigned char *, unsigned int *);
void find_crypto(void);

/* read.c */
PyObject *read_files(PyObject *self, PyObject *args);

/* sink.c */
extern PyTypeObject SinkType;

#endif
