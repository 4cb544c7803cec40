/* Python binding and run-time dispatch of the tq2k kernel (encoder.kernel._tq2k).
 * Arguments are raw addresses checked by the Python wrapper (encoder/kernel/__init__.py): that keeps the
 * per-call overhead to a few microseconds, which matters at batch 1 (24 calls per sentence). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "tq2k.h"

static const char *const PATH_NAMES[TQ2K_NPATHS] = {"reference", "avx2", "avx512vnni", "avx512f32"};
/* Best first; the last entry (the reference) is always available. */
static const int PATH_ORDER[TQ2K_NPATHS] = {TQ2K_AVX512VNNI, TQ2K_AVX2, TQ2K_AVX512F32, TQ2K_REF};

static int path_available(int path) {
    if (path == TQ2K_REF) return 1;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (path == TQ2K_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (path == TQ2K_AVX512F32) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (path == TQ2K_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static PyObject *py_available_paths(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int i = 0; i < TQ2K_NPATHS; i++) {
        const int p = PATH_ORDER[i];
        if (!path_available(p)) continue;
        PyObject *s = PyUnicode_FromString(PATH_NAMES[p]);
        if (!s || PyList_Append(out, s) < 0) { Py_XDECREF(s); Py_DECREF(out); return NULL; }
        Py_DECREF(s);
    }
    return out;
}

static PyObject *py_path_names(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return Py_BuildValue("(ssss)", PATH_NAMES[0], PATH_NAMES[1], PATH_NAMES[2], PATH_NAMES[3]);
}

/* gemm(x, rows, K, w, N, scale, bias, y, path, threads); addresses as ints, bias 0 = none. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t x, w, scale, bias, y;
    int rows, K, N, path, threads;
    if (!PyArg_ParseTuple(args, "niininnnii", &x, &rows, &K, &w, &N, &scale, &bias, &y, &path, &threads))
        return NULL;
    if (rows < 0 || K < 1 || N < 1 || threads < 1) return PyErr_Format(PyExc_ValueError, "bad gemm sizes");
    if (path < 0 || path >= TQ2K_NPATHS || !path_available(path))
        return PyErr_Format(PyExc_RuntimeError, "kernel path %d is not available on this CPU", path);
    if (rows == 0) Py_RETURN_NONE;
    tq2k_args a = {0};
    a.x = (const float *)x; a.rows = rows; a.K = K; a.N = N; a.kpad = (K + 15) / 16 * 16;
    a.w = (const uint8_t *)w; a.scale = (const float *)scale; a.bias = bias ? (const float *)bias : NULL;
    a.y = (float *)y;
    /* Below ~1M MACs (a few microseconds on one core, e.g. any single row) handing work to a helper thread
     * costs more than it saves. */
    a.threads = (double)rows * N * a.kpad < 1048576.0 ? 1 : threads;
    a.q = (int8_t *)malloc((size_t)rows * a.kpad + 64);
    a.groups = (a.kpad + TQ2K_GROUP - 1) / TQ2K_GROUP;
    a.sx = (float *)malloc((size_t)rows * a.groups * sizeof(float));
    a.corr = (float *)malloc((size_t)rows * sizeof(float));
    if (!a.q || !a.sx || !a.corr) {
        free(a.q); free(a.sx); free(a.corr);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    switch (path) {
        case TQ2K_AVX512VNNI: tq2k_gemm_avx512vnni(&a); break;
        case TQ2K_AVX2: tq2k_gemm_avx2(&a); break;
        case TQ2K_AVX512F32: tq2k_gemm_avx512f32(&a); break;
        default: tq2k_gemm_ref(&a); break;
    }
    Py_END_ALLOW_THREADS
    free(a.q); free(a.sx); free(a.corr);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(x, rows, K, w, N, scale, bias, y, path, threads): y = (x @ W^T) * scale + bias (raw addresses)"},
    {"available_paths", py_available_paths, METH_NOARGS, "kernel paths this CPU can run, best first"},
    {"path_names", py_path_names, METH_NOARGS, "all path names, indexed by path id"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_tq2k", "packed 2-bit ternary GEMM", -1, methods};

PyMODINIT_FUNC PyInit__tq2k(void) { return PyModule_Create(&moduledef); }
