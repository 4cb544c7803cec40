"""Every operation of the native forward, each SIMD path against the plain C reference, on random data of odd
shapes (ggml style), and the reference operations against numpy float64 math.

Tolerances: quantization is bit-identical across paths given the same input; float operations differ by
summation order, FMA and the vector exp/erf approximations (relative ~1e-6). Where an operation quantizes its
float result, a value within float rounding of a rounding boundary may land one step away, so quantized
outputs are compared after dequantization, within one step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from encoder import kernel
from encoder.packing import pack_ternary

LIB = kernel._lib()
PATHS = [p for p in kernel.available_paths() if p not in kernel.FLOAT_ACTIVATION_PATHS]
SIMD = [p for p in PATHS if p != "reference"]
SEQ_LENGTHS = [1, 2, 7, 63, 64, 65, 255, 256]
GELU, GELU_TANH, RELU = 0, 1, 2
STORE, ADD, ACT_QUANT = 0, 1, 2


def pid(path: str) -> int:
    return kernel.PATHS.index(path)


def act_buffers(rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    kpad = -(-k // 16) * 16
    groups = -(-kpad // 64)
    return (np.full((rows, kpad), 99, np.int8), np.full((rows, groups), np.nan, np.float32),
            np.full((rows, groups), -1, np.int32))


def dequantize(act, k: int) -> np.ndarray:
    q, sx, _ = act
    return (q.astype(np.float32) * np.repeat(sx, 64, axis=1)[:, : q.shape[1]])[:, :k]


def quantize(path: str, x: np.ndarray):
    act = act_buffers(*x.shape)
    LIB.op_quantize(pid(path), np.ascontiguousarray(x, np.float32), x.shape[0], x.shape[1], act)
    return act


def assert_same_quantization(a, b, k: int, slack_rows_frac: float = 0.0):
    """Equal groups, within one step where float rounding moved a value across a boundary."""
    step = np.repeat(np.maximum(a[1], b[1]), 64, axis=1)[:, :k]
    diff = np.abs(dequantize(a, k) - dequantize(b, k))
    assert (diff <= 1.01 * step + 1e-6 * np.abs(dequantize(a, k)).max()).all()
    np.testing.assert_allclose(a[1], b[1], rtol=2e-5, atol=1e-7)
    assert (a[0][:, k:] == 0).all() and (b[0][:, k:] == 0).all()  # zero padding up to kpad


def gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def numpy_quantize(x: np.ndarray):
    rows, k = x.shape
    act = act_buffers(rows, k)
    q, sx, qs = act
    q[:] = 0
    for g in range(sx.shape[1]):
        v = x[:, 64 * g: 64 * g + 64].astype(np.float32)
        amax = np.abs(v).max(axis=1)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
        c = np.clip(np.rint(v * inv[:, None]), -127, 127).astype(np.int8)
        q[:, 64 * g: 64 * g + v.shape[1]] = c
        sx[:, g] = amax / np.float32(127)
        qs[:, g] = c.astype(np.int32).sum(axis=1)
    return act


# ----------------------------------------------------------------------------- quantization

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 64), (7, 65), (2, 383), (33, 1536), (4, 70)])
def test_quantize_is_bit_identical_to_numpy(path, shape):
    rng = np.random.default_rng(shape[0] * 131 + shape[1])
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 30, size=(shape[0], 1))).astype(np.float32)
    x[0, : min(5, shape[1])] = 0.0
    if shape[0] > 2:
        x[2] = 0.0  # an all-zero row: scale 0, codes 0
    got, want = quantize(path, x), numpy_quantize(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- GEMM epilogues

def gemm(path, act, rows, k, packed, scale, bias, n, epilogue, act_fn=GELU, y=None, threads=2):
    out = act_buffers(rows, n) if epilogue == ACT_QUANT else None
    if y is None and epilogue != ACT_QUANT:
        y = np.zeros((rows, n), np.float32)
    LIB.op_gemm(pid(path), act, rows, k, (packed, scale, bias), n, epilogue, act_fn, y, out, threads)
    return out if epilogue == ACT_QUANT else y


def make_linear(rng, n, k):
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k), p=[0.3, 0.4, 0.3])
    return codes, pack_ternary(codes), rng.uniform(0.01, 0.2, n).astype(np.float32), \
        rng.standard_normal(n).astype(np.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (7, 65, 70), (63, 384, 1152), (65, 1536, 384), (130, 383, 200),
                                      (5, 70, 65)])
def test_gemm_store_and_add(path, rows, k, n):
    rng = np.random.default_rng(rows + k + n)
    codes, packed, scale, bias = make_linear(rng, n, k)
    x = rng.standard_normal((rows, k)).astype(np.float32) * 3
    act = quantize(path, x)
    y = gemm(path, act, rows, k, packed, scale, bias, n, STORE)
    # exact integer dot products of the quantized activations, then the float scales
    want = (dequantize(act, k).astype(np.float64) @ codes.T.astype(np.float64)) * scale + bias
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-4)
    if path != "reference":
        np.testing.assert_allclose(y, gemm("reference", act, rows, k, packed, scale, bias, n, STORE, threads=1),
                                   rtol=1e-5, atol=1e-5)
    resid = rng.standard_normal((rows, n)).astype(np.float32)
    added = gemm(path, act, rows, k, packed, scale, None, n, ADD, y=resid.copy())
    np.testing.assert_allclose(added, resid + want - bias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("act_fn", [GELU, GELU_TANH, RELU])
@pytest.mark.parametrize("rows,k,n", [(3, 384, 1536), (66, 48, 70), (1, 17, 64), (9, 384, 130)])
def test_gemm_activation_epilogue_quantizes_for_the_next_gemm(path, act_fn, rows, k, n):
    rng = np.random.default_rng(rows * k + n + act_fn)
    codes, packed, scale, bias = make_linear(rng, n, k)
    act = quantize(path, rng.standard_normal((rows, k)).astype(np.float32) * 2)
    v = gemm("reference", act, rows, k, packed, scale, bias, n, STORE, threads=1).astype(np.float64)
    f = {GELU: gelu, RELU: lambda z: np.maximum(z, 0),
         GELU_TANH: lambda z: 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))}[act_fn]
    got = gemm(path, act, rows, k, packed, scale, bias, n, ACT_QUANT, act_fn)
    assert_same_quantization(got, numpy_quantize(f(v).astype(np.float32)), n)
    if path != "reference":
        assert_same_quantization(got, gemm("reference", act, rows, k, packed, scale, bias, n, ACT_QUANT, act_fn), n)


# ----------------------------------------------------------------------------- LayerNorm

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (7, 36), (65, 384), (3, 383), (16, 1000)])
def test_layernorm(path, rows, hidden):
    rng = np.random.default_rng(rows + hidden)
    x = (rng.standard_normal((rows, hidden)) * 4 + rng.standard_normal((rows, 1)) * 10).astype(np.float32)
    x[:, 0] += 40  # an outlier channel, as MiniLM has
    w, b = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)
    got, act = x.copy(), act_buffers(rows, hidden)
    LIB.op_layernorm(pid(path), got, rows, hidden, w, b, 1e-12, act)
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-12) * w + b
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert_same_quantization(act, numpy_quantize(want.astype(np.float32)), hidden)
    plain = x.copy()
    LIB.op_layernorm(pid(path), plain, rows, hidden, w, b, 1e-12, None)  # no quantization asked
    np.testing.assert_array_equal(plain, got)


# ----------------------------------------------------------------------------- attention

def numpy_attention(qkv: np.ndarray, offsets, hidden, heads) -> np.ndarray:
    hd = hidden // heads
    ctx = np.zeros((qkv.shape[0], hidden))
    for s in range(len(offsets) - 1):
        rows = slice(offsets[s], offsets[s + 1])
        for h in range(heads):
            cols = slice(h * hd, h * hd + hd)
            q = qkv[rows, cols].astype(np.float64)
            k = qkv[rows, hidden:][:, cols].astype(np.float64)
            v = qkv[rows, 2 * hidden:][:, cols].astype(np.float64)
            scores = q @ k.T / math.sqrt(hd)
            p = np.exp(scores - scores.max(1, keepdims=True))
            ctx[rows, cols] = (p / p.sum(1, keepdims=True)) @ v
    return ctx


def run_attention(path, qkv, offsets, hidden, heads, per_item):
    out, act = qkv.copy(), act_buffers(qkv.shape[0], hidden)
    LIB.op_attention(pid(path), out, np.asarray(offsets, np.int32), hidden, heads, per_item, act)
    return out[:, :hidden], act


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hidden,heads,per_item", [(384, 12, 2), (48, 3, 3), (36, 3, 3), (96, 3, 2)])
def test_attention_each_sequence_at_its_own_length(path, hidden, heads, per_item):
    rng = np.random.default_rng(hidden + heads)
    lengths = SEQ_LENGTHS if hidden == 384 else [1, 2, 7, 65]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    qkv = (rng.standard_normal((offsets[-1], 3 * hidden)) * 2).astype(np.float32)
    ctx, act = run_attention(path, qkv, offsets, hidden, heads, per_item)
    want = numpy_attention(qkv, offsets, hidden, heads)
    np.testing.assert_allclose(ctx, want, rtol=1e-4, atol=2e-5)
    assert_same_quantization(act, numpy_quantize(want.astype(np.float32)), hidden)
    # Key and value columns are read, never written.
    out = qkv.copy()
    LIB.op_attention(pid(path), out, offsets.astype(np.int32), hidden, heads, per_item, None)
    np.testing.assert_array_equal(out[:, hidden:], qkv[:, hidden:])


@pytest.mark.parametrize("path", SIMD)
def test_attention_matches_reference_on_mixed_batches(path):
    rng = np.random.default_rng(7)
    for lengths in ([256, 1, 65, 7], [63, 64, 255, 2, 2]):
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        qkv = (rng.standard_normal((offsets[-1], 1152)) * 3).astype(np.float32)
        ctx, act = run_attention(path, qkv, offsets, 384, 12, 2)
        ref_ctx, ref_act = run_attention("reference", qkv, offsets, 384, 12, 2)
        np.testing.assert_allclose(ctx, ref_ctx, rtol=1e-4, atol=1e-5 * np.abs(ref_ctx).max())
        assert_same_quantization(act, ref_act, 384)


# ----------------------------------------------------------------------------- embedding and pooling

@pytest.fixture(scope="module")
def small_model():
    """A model handle with random tensors (2 layers, hidden 48, 3 heads), per token-embedding storage."""
    from encoder.ternary_format import quantize_rows

    rng = np.random.default_rng(3)
    vocab, hidden, inter, max_pos = 101, 48, 70, 300
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    common = [rng.standard_normal((max_pos, hidden)).astype(np.float32), rng.standard_normal(hidden).astype(np.float32),
              rng.uniform(0.5, 2, hidden).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)]
    layers = []
    for _ in range(2):
        for n, k in ((3 * hidden, hidden), (hidden, hidden)):
            layers += list(make_linear(rng, n, k)[1:])
        layers += [np.ones(hidden, np.float32), np.zeros(hidden, np.float32)]
        for n, k in ((inter, hidden), (hidden, inter)):
            layers += list(make_linear(rng, n, k)[1:])
        layers += [np.ones(hidden, np.float32), np.zeros(hidden, np.float32)]
    models = {}
    for kind, storage in ((0, "float32"), (1, "int8"), (2, "int4"), (3, "int4g16"), (3, "int4g32")):
        group = {"int4g16": 16, "int4g32": 32}.get(storage, 0)
        if kind == 0:
            codes, scale = table, None
        else:
            codes, scale = quantize_rows(table, 8 if kind == 1 else 4, group or None)
        dims = (2, hidden, 3, inter, vocab, max_pos, GELU, 0, 1e-12, kind, group)
        models[storage] = (LIB.model_new(dims, [codes, scale, *common, *layers]), table, codes, scale, common)
    return models


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("storage", ["float32", "int8", "int4", "int4g16", "int4g32"])
def test_embedding_lookup_dequantizes_and_normalizes(path, storage, small_model):
    from encoder.ternary_format import QUANTIZED, dequantize_rows

    model, table, codes, scale, (pos_table, type0, ln_w, ln_b) = small_model[storage]
    rng = np.random.default_rng(11)
    ids = rng.integers(0, 101, 37).astype(np.int32)
    pos = rng.integers(0, 300, 37).astype(np.int32)
    x, act = np.zeros((37, 48), np.float32), act_buffers(37, 48)
    LIB.op_embed(model, pid(path), ids, pos, x, act)
    rows = table[ids] if storage == "float32" else dequantize_rows(codes[ids], scale[ids], QUANTIZED[storage][0], 48,
                                                                   QUANTIZED[storage][1])
    e = rows.astype(np.float64) + pos_table[pos] + type0
    want = (e - e.mean(1, keepdims=True)) / np.sqrt(e.var(1, keepdims=True) + 1e-12) * ln_w + ln_b
    np.testing.assert_allclose(x, want, rtol=2e-5, atol=2e-5)
    assert_same_quantization(act, numpy_quantize(want.astype(np.float32)), 48)
    with pytest.raises(ValueError, match="out of range"):
        LIB.op_embed(model, pid(path), np.array([101], np.int32), np.array([0], np.int32), x[:1], None)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hidden", [1, 48, 383, 384])
def test_pooling_mean_and_cls_normalized(path, hidden):
    rng = np.random.default_rng(hidden)
    offsets = np.concatenate([[0], np.cumsum(SEQ_LENGTHS)]).astype(np.int32)
    x = rng.standard_normal((offsets[-1], hidden)).astype(np.float32)
    for pooling, reduce in ((0, lambda r: r.mean(0)), (1, lambda r: r[0])):
        out = np.zeros((len(SEQ_LENGTHS), hidden), np.float32)
        LIB.op_pool(pid(path), x, offsets, hidden, pooling, out)
        want = np.stack([reduce(x[offsets[s]:offsets[s + 1]].astype(np.float64)) for s in range(len(SEQ_LENGTHS))])
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the whole forward

@pytest.mark.parametrize("path", SIMD)
def test_whole_forward_matches_reference_path_on_mixed_lengths(path, small_model):
    model = small_model["int4g32"][0]
    rng = np.random.default_rng(5)
    offsets = np.concatenate([[0], np.cumsum(SEQ_LENGTHS)]).astype(np.int32)
    ids = rng.integers(0, 101, offsets[-1]).astype(np.int32)
    out = {}
    for p in ("reference", path):
        for max_tokens in (4096, 300):  # chunks of whole sequences (a 256-token one alone) compute the same
            y = np.zeros((len(SEQ_LENGTHS), 48), np.float32)
            LIB.encode(model, ids, offsets, y, pid(p), 2, max_tokens)
            out[p, max_tokens] = y
    np.testing.assert_array_equal(out[path, 4096], out[path, 300])
    np.testing.assert_allclose(np.linalg.norm(out[path, 4096], axis=1), 1.0, rtol=1e-5)
    assert np.min(np.sum(out[path, 4096] * out["reference", 4096], axis=1)) > 0.999
    # one sequence at a time gives the same as the packed batch: no sequence sees another
    alone = np.zeros((1, 48), np.float32)
    LIB.encode(model, ids[offsets[3]:offsets[4]], np.array([0, SEQ_LENGTHS[3]], np.int32), alone, pid(path), 2, 4096)
    np.testing.assert_allclose(alone[0], out[path, 4096][3], atol=1e-6)


def test_encode_rejects_bad_batches(small_model):
    model = small_model["float32"][0]
    y = np.zeros((2, 48), np.float32)
    ids = np.array([1, 2, 3], np.int32)
    for offsets, message in (([0, 0, 3], "sequence 0 has 0 tokens"), ([0, 2, 4], "offsets must run"),
                             ([0, 301, 3], "sequence 0 has 301 tokens")):
        with pytest.raises(ValueError, match=message):
            LIB.encode(model, ids, np.array(offsets, np.int32), y, pid("reference"), 1, 4096)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LIB.encode(model, np.array([1, 200], np.int32), np.array([0, 1, 2], np.int32), y, pid("reference"), 1, 4096)
    with pytest.raises(ValueError, match="bytes"):
        LIB.encode(model, ids, np.array([0, 1, 3], np.int32), np.zeros((1, 48), np.float32), pid("reference"), 1, 64)
    with pytest.raises(ValueError, match="expected 38 tensors"):
        LIB.model_new((2, 48, 3, 70, 101, 300, 0, 0, 1e-12, 0, 0), [])
