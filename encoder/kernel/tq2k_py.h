/* Internals shared by the Python binding's two files (tq2k_module.c, tq2k_ops_py.c). */
#ifndef TQ2K_PY_H
#define TQ2K_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tq2k.h"

#define MAX_VIEWS 12

typedef struct { /* buffer views taken by one call, released together */
    Py_buffer v[MAX_VIEWS];
    int n;
} views;

int path_available(int path);
/* The operations of an int8 path, or NULL (with an exception) for a bad or unavailable one. */
const tq2k_ops *int8_ops(int path);
tq2k_linear make_linear(const void *w, int N, int K, const void *scale, const void *bias);
void release_views(views *vs);
/* A C-contiguous view of at least `need` bytes (writable if asked); NULL with an exception otherwise. */
void *view_of(views *vs, PyObject *obj, Py_ssize_t need, int writable, const char *name);
/* (q, sx, qsum) buffers of activations for `rows` rows of K inputs */
int act_of(views *vs, PyObject *tuple, int rows, int K, tq2k_act *a);
/* Checks sequence offsets: offsets[0] = 0, every length in [1, max_len], offsets[nseq] = tokens. */
int check_offsets(const int32_t *offsets, int nseq, Py_ssize_t tokens, int max_len);
const tq2k_model *model_of(PyObject *capsule);

PyObject *py_op_quantize(PyObject *self, PyObject *args);
PyObject *py_op_gemm(PyObject *self, PyObject *args);
PyObject *py_op_layernorm(PyObject *self, PyObject *args);
PyObject *py_op_attention(PyObject *self, PyObject *args);
PyObject *py_op_embed(PyObject *self, PyObject *args);
PyObject *py_op_pool(PyObject *self, PyObject *args);

#endif
