/* workers.corpus._native: the corpus builder's byte work, in C and mostly without the GIL
 * (setup.py builds it from this directory, optional):
 * - count_bytes, text_flags: scans of corpus text (textscan.py has them in Python);
 * - read_files: a slice of files read beneath a root, links refused anywhere on the path, each
 *   hashed (sha256) and scanned (text_flags) while its bytes are in cache (reading.py);
 * - Sink: the corpus written, hashed and its bytes counted, a batch per call (streams.py).
 * The tests hold each to the pure-Python code it stands in for (tests/test_corpus_native.py). */

#include "native.h"

static PyMethodDef methods[] = {
    {"read_files", read_files, METH_VARARGS,
     "read_files(root_fd, paths, probe, max_file_bytes, budget, line_limit): read files beneath root_fd."},
    {"count_bytes", count_bytes, METH_VARARGS,
     "count_bytes(data, counts): add the count of each byte value in data to counts (256 int64)."},
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
