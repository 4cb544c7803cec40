/* Python binding and run-time dispatch of the tq2k kernel (encoder.kernel._tq2k).
 *
 * `gemm` takes raw addresses checked by the Python wrapper (encoder/kernel/__init__.py): that keeps its
 * per-call overhead to a few microseconds for PackedTernaryLinear. Everything else takes buffer objects
 * (numpy arrays) and checks their byte sizes here, so no call can read or write past a buffer; dtypes are
 * the wrapper's job. `model_new` holds views of the model's arrays for the model's lifetime (a capsule), so
 * `encode` hands C nothing but the token ids of one batch, and runs with the GIL released. The entry points
 * of single operations, for the tests, are in tq2k_ops_py.c. */
#include "tq2k_py.h"

#include <stdlib.h>
#include <string.h>

static const char *const PATH_NAMES[TQ2K_NPATHS] = {"reference", "avx2", "avx512vnni", "avx512f32"};
/* Best first; the last entry (the reference) is always available. */
static const int PATH_ORDER[TQ2K_NPATHS] = {TQ2K_AVX512VNNI, TQ2K_AVX2, TQ2K_AVX512F32, TQ2K_REF};

int path_available(int path) {
    if (path == TQ2K_REF) return 1;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    __builtin_cpu_init();
    if (path == TQ2K_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (path == TQ2K_AVX512F32) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (path == TQ2K_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return 0;
}

/* The operations of an int8 path, or NULL (with an exception) for a bad or unavailable one. */
const tq2k_ops *int8_ops(int path) {
    if (path < 0 || path >= TQ2K_NPATHS || !path_available(path)) {
        PyErr_Format(PyExc_RuntimeError, "kernel path %d is not available on this CPU", path);
        return NULL;
    }
    if (path == TQ2K_AVX512F32) {
        PyErr_SetString(PyExc_ValueError, "avx512f32 (float activations) is a GEMM-only path");
        return NULL;
    }
    return path == TQ2K_AVX512VNNI ? &tq2k_ops_avx512vnni : path == TQ2K_AVX2 ? &tq2k_ops_avx2 : &tq2k_ops_ref;
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

static int alloc_act(tq2k_act *a, int rows, int K) {
    a->kpad = tq2k_pad16(K);
    a->groups = tq2k_groups(a->kpad);
    a->q = (int8_t *)malloc((size_t)rows * a->kpad + 64);
    a->sx = (float *)malloc(((size_t)rows * a->groups + 1) * sizeof(float));
    a->qsum = (int32_t *)malloc(((size_t)rows * a->groups + 1) * sizeof(int32_t));
    if (a->q && a->sx && a->qsum) return 0;
    free(a->q); free(a->sx); free(a->qsum);
    return -1;
}

tq2k_linear make_linear(const void *w, int N, int K, const void *scale, const void *bias) {
    tq2k_linear L;
    L.w = (const uint8_t *)w; L.scale = (const float *)scale; L.bias = (const float *)bias;
    L.N = N; L.K = K; L.kpad = tq2k_pad16(K); L.groups = tq2k_groups(L.kpad);
    return L;
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
    const tq2k_linear L = make_linear((const void *)w, N, K, (const void *)scale, bias ? (const void *)bias : NULL);
    if (path == TQ2K_AVX512F32) {
        Py_BEGIN_ALLOW_THREADS
        tq2k_gemm_avx512f32((const float *)x, rows, &L, (float *)y, threads);
        Py_END_ALLOW_THREADS
        Py_RETURN_NONE;
    }
    const tq2k_ops *ops = int8_ops(path);
    tq2k_act a;
    if (alloc_act(&a, rows, K) < 0) return PyErr_NoMemory();
    const tq2k_gemm_job job = {&L, &a, rows, TQ2K_EPI_STORE, (float *)y, N, NULL, 0};
    Py_BEGIN_ALLOW_THREADS
    tq2k_quantize_run(ops, (const float *)x, K, &a, rows, threads);
    tq2k_gemm_run(ops, &job, threads);
    Py_END_ALLOW_THREADS
    free(a.q); free(a.sx); free(a.qsum);
    Py_RETURN_NONE;
}

/* ----------------------------------------------------------------------------------------- buffers */

void release_views(views *vs) {
    for (int i = 0; i < vs->n; i++) PyBuffer_Release(&vs->v[i]);
    vs->n = 0;
}

/* A C-contiguous view of at least `need` bytes (writable if asked); NULL with an exception otherwise. */
void *view_of(views *vs, PyObject *obj, Py_ssize_t need, int writable, const char *name) {
    if (vs->n == MAX_VIEWS) {
        PyErr_SetString(PyExc_RuntimeError, "too many buffers");
        return NULL;
    }
    Py_buffer *v = &vs->v[vs->n];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return NULL;
    if (v->len < need) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, needs %zd", name, v->len, need);
        PyBuffer_Release(v);
        return NULL;
    }
    vs->n++;
    return v->buf;
}

/* (q, sx, qsum) buffers of activations for `rows` rows of K inputs */
int act_of(views *vs, PyObject *tuple, int rows, int K, tq2k_act *a) {
    PyObject *q, *sx, *qsum;
    if (!PyArg_ParseTuple(tuple, "OOO", &q, &sx, &qsum)) return -1;
    a->kpad = tq2k_pad16(K);
    a->groups = tq2k_groups(a->kpad);
    a->q = (int8_t *)view_of(vs, q, (Py_ssize_t)rows * a->kpad, 1, "q");
    if (!a->q) return -1;
    a->sx = (float *)view_of(vs, sx, (Py_ssize_t)rows * a->groups * 4, 1, "sx");
    if (!a->sx) return -1;
    a->qsum = (int32_t *)view_of(vs, qsum, (Py_ssize_t)rows * a->groups * 4, 1, "qsum");
    return a->qsum ? 0 : -1;
}

/* Checks sequence offsets: offsets[0] = 0, every length in [1, max_len], offsets[nseq] = tokens. */
int check_offsets(const int32_t *offsets, int nseq, Py_ssize_t tokens, int max_len) {
    if (offsets[0] != 0 || offsets[nseq] != tokens) {
        PyErr_Format(PyExc_ValueError, "offsets must run from 0 to the number of tokens (%zd)", tokens);
        return -1;
    }
    for (int s = 0; s < nseq; s++) {
        const int L = offsets[s + 1] - offsets[s];
        if (L < 1 || L > max_len) {
            PyErr_Format(PyExc_ValueError, "sequence %d has %d tokens; must be 1 to %d", s, L, max_len);
            return -1;
        }
    }
    return 0;
}

/* ----------------------------------------------------------------------------------------- the model */

#define GLOBAL_TENSORS 6
#define LAYER_TENSORS 16

typedef struct {
    tq2k_model m;
    int nviews;
    Py_buffer *v;
} model_holder;

static void model_free(PyObject *capsule) {
    model_holder *h = (model_holder *)PyCapsule_GetPointer(capsule, "tq2k.model");
    if (!h) return;
    for (int i = 0; i < h->nviews; i++) PyBuffer_Release(&h->v[i]);
    free(h->v);
    free(h->m.layer);
    free(h);
}

/* model_new((layers, hidden, heads, inter, vocab, max_pos, act_fn, pooling, eps, emb_kind, emb_group), tensors):
 * tensors = [emb_codes, emb_scale or None, pos, type0, emb_ln_w, emb_ln_b] + per layer
 * [qkv_w, qkv_scale, qkv_bias, out_w, out_scale, out_bias, ln1_w, ln1_b, up_w, up_scale, up_bias,
 *  down_w, down_scale, down_bias, ln2_w, ln2_b]; weights packed (encoder.packing), everything else float32. */
static PyObject *py_model_new(PyObject *self, PyObject *args) {
    (void)self;
    tq2k_model m;
    memset(&m, 0, sizeof m);
    PyObject *tensors;
    if (!PyArg_ParseTuple(args, "(iiiiiiiifii)O!", &m.layers, &m.hidden, &m.heads, &m.inter, &m.vocab, &m.max_pos,
                          &m.act_fn, &m.pooling, &m.eps, &m.emb_kind, &m.emb_group, &PyList_Type, &tensors))
        return NULL;
    if (m.layers < 1 || m.hidden < 1 || m.heads < 1 || m.hidden % m.heads || m.inter < 1 || m.vocab < 1 ||
        m.max_pos < 1 || m.act_fn < 0 || m.act_fn > TQ2K_RELU || m.pooling < 0 || m.pooling > TQ2K_POOL_CLS ||
        m.emb_kind < 0 || m.emb_kind > TQ2K_EMB_I4G || (m.emb_kind == TQ2K_EMB_I4G && m.emb_group < 1))
        return PyErr_Format(PyExc_ValueError, "bad model dimensions");
    const int n = GLOBAL_TENSORS + LAYER_TENSORS * m.layers;
    if (PyList_GET_SIZE(tensors) != n) return PyErr_Format(PyExc_ValueError, "expected %d tensors", n);
    model_holder *h = (model_holder *)calloc(1, sizeof *h);
    if (!h) return PyErr_NoMemory();
    h->v = (Py_buffer *)calloc((size_t)n, sizeof(Py_buffer));
    h->m = m;
    h->m.layer = (tq2k_layer *)calloc((size_t)m.layers, sizeof(tq2k_layer));
    PyObject *capsule = NULL;
    if (!h->v || !h->m.layer) {
        free(h->v); free(h->m.layer); free(h);
        return PyErr_NoMemory();
    }
    capsule = PyCapsule_New(h, "tq2k.model", model_free);
    if (!capsule) {
        free(h->v); free(h->m.layer); free(h);
        return NULL;
    }
    const Py_ssize_t H = m.hidden, V = m.vocab, F4 = 4;
    const Py_ssize_t emb_bytes[] = {V * H * 4, V * H, V * ((H + 1) / 2), V * ((H + 1) / 2)};
    const Py_ssize_t scale_bytes[] = {0, V * 4, V * 4, V * ((H + m.emb_group - 1) / (m.emb_group ? m.emb_group : 1)) * 2};
    Py_ssize_t need[GLOBAL_TENSORS + LAYER_TENSORS];
    const void *ptr[GLOBAL_TENSORS + LAYER_TENSORS];
    for (int i = 0; i < n; i++) {
        const int j = i < GLOBAL_TENSORS ? i : GLOBAL_TENSORS + (i - GLOBAL_TENSORS) % LAYER_TENSORS;
        if (j < GLOBAL_TENSORS) {
            const Py_ssize_t g[GLOBAL_TENSORS] = {emb_bytes[m.emb_kind], scale_bytes[m.emb_kind], (Py_ssize_t)m.max_pos * H * F4,
                                                  H * F4, H * F4, H * F4};
            need[j] = g[j];
        } else {
            const Py_ssize_t k = j - GLOBAL_TENSORS, I = m.inter;
            const Py_ssize_t rows[4] = {3 * H, H, I, H}, cols[4] = {H, H, H, I}; /* qkv, out, up, down */
            if (k == 6 || k == 7 || k == 14 || k == 15) {
                need[j] = H * F4; /* LayerNorm */
            } else {
                const int lin = k < 6 ? k / 3 : (k - 8) / 3 + 2, part = k < 6 ? k % 3 : (k - 8) % 3;
                need[j] = part == 0 ? (Py_ssize_t)tq2k_pad16((int)rows[lin]) * tq2k_pad16((int)cols[lin]) / 4
                                    : rows[lin] * F4;
            }
        }
        PyObject *obj = PyList_GET_ITEM(tensors, i);
        if (j == 1 && m.emb_kind == TQ2K_EMB_F32) { /* no scale */
            ptr[j] = NULL;
            continue;
        }
        Py_buffer *v = &h->v[h->nviews];
        if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS) < 0) goto fail;
        h->nviews++;
        if (v->len != need[j]) {
            PyErr_Format(PyExc_ValueError, "model tensor %d has %zd bytes, expected %zd", i, v->len, need[j]);
            goto fail;
        }
        ptr[j] = v->buf;
        if (j == GLOBAL_TENSORS - 1) {
            h->m.emb_codes = ptr[0]; h->m.emb_scale = ptr[1]; h->m.pos = (const float *)ptr[2];
            h->m.type0 = (const float *)ptr[3]; h->m.emb_ln_w = (const float *)ptr[4]; h->m.emb_ln_b = (const float *)ptr[5];
        } else if (j == GLOBAL_TENSORS + LAYER_TENSORS - 1) {
            tq2k_layer *ly = &h->m.layer[(i - GLOBAL_TENSORS) / LAYER_TENSORS];
            const void **p = ptr + GLOBAL_TENSORS;
            ly->qkv = make_linear(p[0], 3 * m.hidden, m.hidden, p[1], p[2]);
            ly->out = make_linear(p[3], m.hidden, m.hidden, p[4], p[5]);
            ly->ln1_w = (const float *)p[6]; ly->ln1_b = (const float *)p[7];
            ly->up = make_linear(p[8], m.inter, m.hidden, p[9], p[10]);
            ly->down = make_linear(p[11], m.hidden, m.inter, p[12], p[13]);
            ly->ln2_w = (const float *)p[14]; ly->ln2_b = (const float *)p[15];
        }
    }
    return capsule;
fail:
    Py_DECREF(capsule); /* releases the views taken so far */
    return NULL;
}

const tq2k_model *model_of(PyObject *capsule) {
    model_holder *h = (model_holder *)PyCapsule_GetPointer(capsule, "tq2k.model");
    return h ? &h->m : NULL;
}

/* encode(model, ids int32 (tokens,), offsets int32 (nseq + 1,), out float32 (nseq, hidden), path, threads,
 * max_tokens) */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ids_o, *off_o, *out_o;
    int path, threads, max_tokens;
    if (!PyArg_ParseTuple(args, "OOOOiii", &cap, &ids_o, &off_o, &out_o, &path, &threads, &max_tokens)) return NULL;
    const tq2k_model *m = model_of(cap);
    const tq2k_ops *ops = m ? int8_ops(path) : NULL;
    if (!ops) return NULL;
    if (threads < 1 || max_tokens < 1) return PyErr_Format(PyExc_ValueError, "threads and max_tokens must be >= 1");
    views vs = {.n = 0};
    const int32_t *ids = (const int32_t *)view_of(&vs, ids_o, 0, 0, "ids");
    const int32_t *offsets = ids ? (const int32_t *)view_of(&vs, off_o, 4, 0, "offsets") : NULL;
    if (!offsets) { release_views(&vs); return NULL; }
    const Py_ssize_t tokens = vs.v[0].len / 4;
    const int nseq = (int)(vs.v[1].len / 4) - 1;
    float *out = (float *)view_of(&vs, out_o, (Py_ssize_t)nseq * m->hidden * 4, 1, "out");
    int rc = out ? check_offsets(offsets, nseq, tokens, m->max_pos) : -1;
    for (Py_ssize_t t = 0; rc == 0 && t < tokens; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab) {
            PyErr_Format(PyExc_ValueError, "token id %d is outside the vocabulary (%d)", ids[t], m->vocab);
            rc = -1;
        }
    if (rc == 0) {
        Py_BEGIN_ALLOW_THREADS
        rc = tq2k_encode(m, ops, ids, offsets, nseq, out, threads, max_tokens);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_NoMemory();
    }
    release_views(&vs);
    if (rc) return NULL;
    Py_RETURN_NONE;
}

/* peak_avx2(iterations, threads) -> multiply-adds per second (0.0 without AVX2) */
static PyObject *py_peak_avx2(PyObject *self, PyObject *args) {
    (void)self;
    long iterations;
    int threads;
    if (!PyArg_ParseTuple(args, "li", &iterations, &threads)) return NULL;
    if (iterations < 1 || threads < 1) return PyErr_Format(PyExc_ValueError, "iterations and threads must be >= 1");
    double macs = 0.0;
    if (path_available(TQ2K_AVX2)) {
        Py_BEGIN_ALLOW_THREADS
        macs = tq2k_peak_avx2(iterations, threads);
        Py_END_ALLOW_THREADS
    }
    return PyFloat_FromDouble(macs);
}

static PyMethodDef methods[] = {
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(x, rows, K, w, N, scale, bias, y, path, threads): y = (x @ W^T) * scale + bias (raw addresses)"},
    {"available_paths", py_available_paths, METH_NOARGS, "kernel paths this CPU can run, best first"},
    {"path_names", py_path_names, METH_NOARGS, "all path names, indexed by path id"},
    {"model_new", py_model_new, METH_VARARGS, "model_new(dims, tensors) -> model handle (see tq2k_module.c)"},
    {"encode", py_encode, METH_VARARGS, "encode(model, ids, offsets, out, path, threads, max_tokens)"},
    {"op_quantize", py_op_quantize, METH_VARARGS, "one operation of a path (tests)"},
    {"op_gemm", py_op_gemm, METH_VARARGS, "one operation of a path (tests)"},
    {"op_layernorm", py_op_layernorm, METH_VARARGS, "one operation of a path (tests)"},
    {"op_attention", py_op_attention, METH_VARARGS, "one operation of a path (tests)"},
    {"op_embed", py_op_embed, METH_VARARGS, "one operation of a path (tests)"},
    {"op_pool", py_op_pool, METH_VARARGS, "one operation of a path (tests)"},
    {"peak_avx2", py_peak_avx2, METH_VARARGS, "peak_avx2(iterations, threads) -> vpmaddubsw multiply-adds per second"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_tq2k", "packed 2-bit ternary kernel and encoder", -1,
                                       methods};

PyMODINIT_FUNC PyInit__tq2k(void) { return PyModule_Create(&moduledef); }
