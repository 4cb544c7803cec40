/* Entry points of single operations of a path, on numpy buffers: what tests/test_native_ops.py compares path by
 * path (the encoder itself only calls tq2k_encode). Byte sizes are checked here, dtypes by the caller. */
#include "tq2k_py.h"


/* op_quantize(path, x float32 (rows, K), rows, K, (q, sx, qsum)) */
PyObject *py_op_quantize(PyObject *self, PyObject *args) {
    (void)self;
    int path, rows, K;
    PyObject *x_o, *act_o;
    if (!PyArg_ParseTuple(args, "iOiiO", &path, &x_o, &rows, &K, &act_o)) return NULL;
    const tq2k_ops *ops = int8_ops(path);
    if (!ops) return NULL;
    views vs = {.n = 0};
    tq2k_act a;
    const float *x = (const float *)view_of(&vs, x_o, (Py_ssize_t)rows * K * 4, 0, "x");
    if (x && act_of(&vs, act_o, rows, K, &a) == 0) ops->quantize(x, K, K, &a, 0, rows);
    release_views(&vs);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* op_gemm(path, (q, sx, qsum), rows, K, (w, scale, bias or None), N, epilogue, act_fn, y or None,
 *         (q, sx, qsum) or None, threads): the input must be quantized already */
PyObject *py_op_gemm(PyObject *self, PyObject *args) {
    (void)self;
    int path, rows, K, N, epi, act_fn, threads;
    PyObject *in_o, *lin_o, *y_o, *out_o, *w_o, *s_o, *b_o;
    if (!PyArg_ParseTuple(args, "iOiiOiiiOOi", &path, &in_o, &rows, &K, &lin_o, &N, &epi, &act_fn, &y_o, &out_o,
                          &threads))
        return NULL;
    const tq2k_ops *ops = int8_ops(path);
    if (!ops) return NULL;
    if (rows < 0 || K < 1 || N < 1 || threads < 1 || epi < 0 || epi > TQ2K_EPI_ACT_QUANT || act_fn < 0 ||
        act_fn > TQ2K_RELU)
        return PyErr_Format(PyExc_ValueError, "bad op_gemm arguments");
    if (!PyArg_ParseTuple(lin_o, "OOO", &w_o, &s_o, &b_o)) return NULL;
    views vs = {.n = 0};
    tq2k_act in, out = {0};
    const void *w = NULL, *scale = NULL, *bias = NULL;
    float *y = NULL;
    int ok = act_of(&vs, in_o, rows, K, &in) == 0;
    ok = ok && (w = view_of(&vs, w_o, (Py_ssize_t)tq2k_pad16(N) * tq2k_pad16(K) / 4, 0, "w"));
    ok = ok && (scale = view_of(&vs, s_o, (Py_ssize_t)N * 4, 0, "scale"));
    ok = ok && (b_o == Py_None || (bias = view_of(&vs, b_o, (Py_ssize_t)N * 4, 0, "bias")));
    if (ok && epi == TQ2K_EPI_ACT_QUANT) ok = act_of(&vs, out_o, rows, N, &out) == 0;
    else if (ok) ok = (y = (float *)view_of(&vs, y_o, (Py_ssize_t)rows * N * 4, 1, "y")) != NULL;
    if (ok) {
        const tq2k_linear L = make_linear(w, N, K, scale, bias);
        const tq2k_gemm_job job = {&L, &in, rows, epi, y, N, &out, act_fn};
        Py_BEGIN_ALLOW_THREADS
        tq2k_gemm_run(ops, &job, threads);
        Py_END_ALLOW_THREADS
    }
    release_views(&vs);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* op_layernorm(path, x float32 (rows, hidden) in place, rows, hidden, w, b, eps, (q, sx, qsum) or None) */
PyObject *py_op_layernorm(PyObject *self, PyObject *args) {
    (void)self;
    int path, rows, hidden;
    float eps;
    PyObject *x_o, *w_o, *b_o, *act_o;
    if (!PyArg_ParseTuple(args, "iOiiOOfO", &path, &x_o, &rows, &hidden, &w_o, &b_o, &eps, &act_o)) return NULL;
    const tq2k_ops *ops = int8_ops(path);
    if (!ops) return NULL;
    views vs = {.n = 0};
    tq2k_act a;
    float *x = (float *)view_of(&vs, x_o, (Py_ssize_t)rows * hidden * 4, 1, "x");
    const float *w = x ? (const float *)view_of(&vs, w_o, (Py_ssize_t)hidden * 4, 0, "w") : NULL;
    const float *b = w ? (const float *)view_of(&vs, b_o, (Py_ssize_t)hidden * 4, 0, "b") : NULL;
    const int ok = b && (act_o == Py_None || act_of(&vs, act_o, rows, hidden, &a) == 0);
    if (ok) ops->layernorm(x, hidden, w, b, eps, act_o == Py_None ? NULL : &a, 0, rows);
    release_views(&vs);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* op_attention(path, qkv float32 (tokens, 3 hidden) in place, offsets int32, hidden, heads, heads_per_item,
 *              (q, sx, qsum) or None) */
PyObject *py_op_attention(PyObject *self, PyObject *args) {
    (void)self;
    int path, hidden, heads, per_item;
    PyObject *qkv_o, *off_o, *act_o;
    if (!PyArg_ParseTuple(args, "iOOiiiO", &path, &qkv_o, &off_o, &hidden, &heads, &per_item, &act_o)) return NULL;
    const tq2k_ops *ops = int8_ops(path);
    if (!ops) return NULL;
    if (hidden < 1 || heads < 1 || hidden % heads || per_item < 1)
        return PyErr_Format(PyExc_ValueError, "bad attention shape");
    views vs = {.n = 0};
    tq2k_act a;
    const int32_t *offsets = (const int32_t *)view_of(&vs, off_o, 4, 0, "offsets");
    const int nseq = offsets ? (int)(vs.v[0].len / 4) - 1 : 0;
    const Py_ssize_t tokens = offsets ? offsets[nseq] : 0;
    float *qkv = offsets ? (float *)view_of(&vs, qkv_o, tokens * 3 * hidden * 4, 1, "qkv") : NULL;
    int ok = qkv && check_offsets(offsets, nseq, tokens, 1 << 20) == 0;
    ok = ok && (act_o == Py_None || act_of(&vs, act_o, (int)tokens, hidden, &a) == 0);
    for (int s = 0; ok && s < nseq; s++)
        for (int h0 = 0; h0 < heads; h0 += per_item)
            ops->attention(qkv, hidden, heads, offsets[s], offsets[s + 1] - offsets[s], h0,
                           h0 + per_item < heads ? h0 + per_item : heads, act_o == Py_None ? NULL : &a);
    release_views(&vs);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* op_embed(model, path, ids int32, pos int32, x float32 (tokens, hidden), (q, sx, qsum) or None) */
PyObject *py_op_embed(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ids_o, *pos_o, *x_o, *act_o;
    int path;
    if (!PyArg_ParseTuple(args, "OiOOOO", &cap, &path, &ids_o, &pos_o, &x_o, &act_o)) return NULL;
    const tq2k_model *m = model_of(cap);
    const tq2k_ops *ops = m ? int8_ops(path) : NULL;
    if (!ops) return NULL;
    views vs = {.n = 0};
    tq2k_act a;
    const int32_t *ids = (const int32_t *)view_of(&vs, ids_o, 0, 0, "ids");
    const int tokens = ids ? (int)(vs.v[0].len / 4) : 0;
    const int32_t *pos = ids ? (const int32_t *)view_of(&vs, pos_o, (Py_ssize_t)tokens * 4, 0, "pos") : NULL;
    float *x = pos ? (float *)view_of(&vs, x_o, (Py_ssize_t)tokens * m->hidden * 4, 1, "x") : NULL;
    int ok = x && (act_o == Py_None || act_of(&vs, act_o, tokens, m->hidden, &a) == 0);
    for (int t = 0; ok && t < tokens; t++)
        if (ids[t] < 0 || ids[t] >= m->vocab || pos[t] < 0 || pos[t] >= m->max_pos) {
            PyErr_Format(PyExc_ValueError, "token %d: id or position out of range", t);
            ok = 0;
        }
    if (ok) ops->embed(m, ids, pos, x, act_o == Py_None ? NULL : &a, 0, tokens);
    release_views(&vs);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* op_pool(path, x float32 (tokens, hidden), offsets int32, hidden, pooling, out float32 (nseq, hidden)) */
PyObject *py_op_pool(PyObject *self, PyObject *args) {
    (void)self;
    int path, hidden, pooling;
    PyObject *x_o, *off_o, *out_o;
    if (!PyArg_ParseTuple(args, "iOOiiO", &path, &x_o, &off_o, &hidden, &pooling, &out_o)) return NULL;
    const tq2k_ops *ops = int8_ops(path);
    if (!ops) return NULL;
    views vs = {.n = 0};
    const int32_t *offsets = (const int32_t *)view_of(&vs, off_o, 4, 0, "offsets");
    const int nseq = offsets ? (int)(vs.v[0].len / 4) - 1 : 0;
    const Py_ssize_t tokens = offsets ? offsets[nseq] : 0;
    const float *x = offsets ? (const float *)view_of(&vs, x_o, tokens * hidden * 4, 0, "x") : NULL;
    float *out = x ? (float *)view_of(&vs, out_o, (Py_ssize_t)nseq * hidden * 4, 1, "out") : NULL;
    const int ok = out && hidden > 0 && check_offsets(offsets, nseq, tokens, 1 << 20) == 0;
    for (int s = 0; ok && s < nseq; s++)
        ops->pool(x, hidden, offsets[s], offsets[s + 1] - offsets[s], pooling, out + (size_t)s * hidden);
    release_views(&vs);
    if (!ok) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad pooling arguments");
        return NULL;
    }
    Py_RETURN_NONE;
}
