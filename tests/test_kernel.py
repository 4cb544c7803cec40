"""The native tq2k kernel: every path against the plain C reference and against float math on the unpacked
weights, on odd shapes; PackedTernaryLinear against nn.Linear with the dequantized weight.

Tolerances:
- SIMD path vs reference: the int8 quantization and the int32 dot products are bit-identical, only the final
  `acc * (sx * scale) + bias` may round differently (FMA): rtol 1e-5 of the output magnitude.
- any int8 path vs float32 math on the unpacked weights: activations are rounded to int8 per group of 64
  inputs, each by at most half a step of its group, and a group's step is at most the row's absmax / 127, so
  |y - y_float| <= 0.5 * absmax(x_row)/127 * |scale[n]| * nnz(W[n]) (plus float slack).
- the float-activation path vs float64 math: float32 accumulation only, within 1e-4 of sum|x| * |scale[n]|.
"""

import os

import numpy as np
import pytest
import torch

from encoder import kernel
from encoder.packed_linear import PackedTernaryLinear
from encoder.packing import pack_ternary, packed_nbytes

PATHS = kernel.available_paths()
INT8_PATHS = [p for p in PATHS if p not in kernel.FLOAT_ACTIVATION_PATHS]
FLOAT_PATHS = [p for p in PATHS if p in kernel.FLOAT_ACTIVATION_PATHS]
SHAPES = [  # (rows, in_features, out_features): none of in/out a multiple of 64
    (1, 1, 1), (1, 3, 65), (2, 65, 3), (7, 383, 1000), (33, 1000, 65), (64, 65, 383), (257, 383, 65),
    (5, 1000, 17), (1, 1000, 383), (257, 3, 1),
]


def make_case(rows, in_f, out_f, seed, bias=True):
    rng = np.random.default_rng(seed)
    codes = rng.choice(np.array([-1, 0, 1], np.int8), size=(out_f, in_f), p=[0.3, 0.4, 0.3])
    x = (rng.standard_normal((rows, in_f)) * rng.uniform(0.1, 10, size=(rows, 1))).astype(np.float32)
    scale = rng.uniform(0.01, 0.2, out_f).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32) if bias else None
    return codes, x, scale, b


def float_reference(codes, x, scale, bias):
    y = (x.astype(np.float64) @ codes.T.astype(np.float64)) * scale
    return y + bias if bias is not None else y


def quantization_bound(codes, x, scale):
    sx = np.abs(x).max(axis=1, keepdims=True) / 127.0
    return 0.5 * sx * np.abs(scale) * (codes != 0).sum(axis=1) * (1 + 1e-4) + 1e-4


def test_reference_always_available_and_cpuid_matches_cpuinfo():
    assert PATHS[-1] == "reference"
    assert tuple(kernel._tq2k.path_names()) == kernel.PATHS
    if "TERNREC_KERNEL_PATH" not in os.environ:
        assert kernel.default_path() == INT8_PATHS[0]  # the float-activation path is never the default
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read()
    if " avx512_vnni" in flags and " avx512bw" in flags and " avx512vl" in flags:
        assert "avx512vnni" in PATHS and "avx512f32" in PATHS
    if " avx2" in flags and " fma" in flags:
        assert "avx2" in PATHS


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_path_matches_reference_and_float(path, shape):
    codes, x, scale, bias = make_case(*shape, seed=sum(shape))
    packed = pack_ternary(codes)
    y = kernel.ternary_matmul(x, packed, shape[2], scale, bias, path=path)
    y_ref = kernel.ternary_matmul(x, packed, shape[2], scale, bias, path="reference")
    assert y.shape == (shape[0], shape[2]) and y.dtype == np.float32
    mag = np.abs(y_ref).max() + 1e-6
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * mag)
    err = np.abs(y - float_reference(codes, x, scale, bias))
    bound = quantization_bound(codes, x, scale)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"


@pytest.mark.parametrize("path", FLOAT_PATHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float_activation_path_matches_float(path, shape):
    codes, x, scale, bias = make_case(*shape, seed=sum(shape))
    y = kernel.ternary_matmul(x, pack_ternary(codes), shape[2], scale, bias, path=path)
    bound = 1e-4 * np.abs(x).sum(axis=1, keepdims=True) * scale + 1e-5 * np.abs(bias) + 1e-6
    assert (np.abs(y - float_reference(codes, x, scale, bias)) <= bound).all()


@pytest.mark.parametrize("path", PATHS)
def test_exact_when_activations_are_int8(path):
    # Integer x with absmax 127 in every group of 64 inputs quantizes to itself (every group scale is 1):
    # the result must be exact integer math.
    rng = np.random.default_rng(1)
    codes = rng.integers(-1, 2, size=(97, 531)).astype(np.int8)
    x = rng.integers(-127, 128, size=(19, 531)).astype(np.float32)
    x[:, ::64] = 127
    scale = np.full(97, 0.5, np.float32)
    y = kernel.ternary_matmul(x, pack_ternary(codes), 97, scale, None, path=path)
    np.testing.assert_array_equal(y, (x.astype(np.int64) @ codes.T.astype(np.int64)) * 0.5)


@pytest.mark.parametrize("path", PATHS)
def test_extreme_values_do_not_saturate(path):
    # Largest int8 products everywhere (code +1 stored as 2, |q| = 127): int16/int32 sums must not clip.
    k = 1000
    codes = np.ones((33, k), np.int8)
    codes[1] = -1
    x = np.stack([np.full(k, 127.0), np.full(k, -127.0)]).astype(np.float32)
    y = kernel.ternary_matmul(x, pack_ternary(codes), 33, np.ones(33, np.float32), None, path=path)
    np.testing.assert_array_equal(y[:, 0], [127 * k, -127 * k])
    np.testing.assert_array_equal(y[:, 1], [-127 * k, 127 * k])


@pytest.mark.parametrize("path", PATHS)
def test_zero_rows_and_threads(path):
    codes, x, scale, bias = make_case(130, 383, 200, seed=3)
    packed = pack_ternary(codes)
    x[5] = 0.0  # an all-zero row gives exactly the bias
    y1 = kernel.ternary_matmul(x, packed, 200, scale, bias, path=path, threads=1)
    y2 = kernel.ternary_matmul(x, packed, 200, scale, bias, path=path, threads=2)
    np.testing.assert_array_equal(y1, y2)  # threads split work, not sums: results are identical
    np.testing.assert_array_equal(y1[5], bias)
    empty = kernel.ternary_matmul(np.zeros((0, 383), np.float32), packed, 200, scale, bias, path=path)
    assert empty.shape == (0, 200)


def test_bad_arguments():
    codes, x, scale, bias = make_case(2, 65, 17, seed=4)
    packed = pack_ternary(codes)
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x, packed, 17, scale, bias, path="sse9")
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x, packed[:-1], 17, scale, bias)
    with pytest.raises(ValueError):
        kernel.ternary_matmul(x, packed, 17, scale[:-1], bias)
    with pytest.raises(TypeError):
        kernel.ternary_matmul(x.astype(np.float64), packed, 17, scale, bias)


@pytest.mark.parametrize("path", INT8_PATHS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear_matches_nn_linear(path, with_bias):
    out_f, in_f = 383, 65
    codes, x, scale, bias = make_case(1, in_f, out_f, seed=5, bias=with_bias)
    codes_t = torch.from_numpy(codes)
    layer = PackedTernaryLinear.from_codes(codes_t, torch.from_numpy(scale),
                                           None if bias is None else torch.from_numpy(bias), path=path)
    ref = torch.nn.Linear(in_f, out_f, bias=with_bias)
    with torch.no_grad():
        ref.weight.copy_(codes_t.float() * torch.from_numpy(scale)[:, None])
        if with_bias:
            ref.bias.copy_(torch.from_numpy(bias))
    xs = torch.randn(2, 3, 5, in_f) * 3
    with torch.inference_mode():
        y = layer(xs)
        y_ref = ref(xs)
    assert y.shape == (2, 3, 5, out_f)
    bound = quantization_bound(codes, xs.reshape(-1, in_f).numpy(), scale)
    assert (np.abs(y.reshape(-1, out_f).numpy() - y_ref.reshape(-1, out_f).numpy()) <= bound).all()
    # weights stay packed: no float weight, 2 bits per (padded) weight
    assert not list(layer.parameters())
    assert layer.packed.dtype == torch.uint8 and layer.packed.nbytes == packed_nbytes(out_f, in_f)
    assert layer.nbytes == packed_nbytes(out_f, in_f) + 4 * out_f * (2 if with_bias else 1)


def test_packed_linear_keeps_callers_bytes_and_rejects_bad_shapes():
    codes = np.random.default_rng(6).integers(-1, 2, size=(16, 48)).astype(np.int8)
    packed = pack_ternary(codes)
    layer = PackedTernaryLinear(packed, 48, 16, torch.ones(16), None)
    assert layer.packed.data_ptr() == packed.ctypes.data  # shared, not copied
    with pytest.raises(ValueError):
        PackedTernaryLinear(packed, 48, 17, torch.ones(17), None)
    with pytest.raises(ValueError):
        PackedTernaryLinear(packed, 48, 16, torch.ones(15), None)
    with pytest.raises(ValueError), torch.inference_mode():
        layer(torch.zeros(2, 47))
    with torch.inference_mode():
        x = torch.randn(3, 48)
        y = layer(x)
    layer.half()  # a whole-model dtype cast must not hand the kernel half-precision scales
    assert layer.scale.dtype == torch.float32 and layer.packed.dtype == torch.uint8
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), y)
    frozen = np.frombuffer(packed.tobytes(), np.uint8)  # read-only bytes, as from a file
    with torch.inference_mode():
        x = torch.randn(3, 48)
        torch.testing.assert_close(PackedTernaryLinear(frozen, 48, 16, torch.ones(16), None)(x), layer(x))


def test_concurrent_callers_and_fork():
    # The work-sharing pool serves one caller at a time; concurrent callers (GIL released) must still get
    # exact results, and a forked child (no helper threads) must not hang.
    import threading

    codes, x, scale, bias = make_case(96, 383, 200, seed=7)
    packed = pack_ternary(codes)
    want = kernel.ternary_matmul(x, packed, 200, scale, bias, threads=1)
    errors = []

    def call():
        for _ in range(30):
            got = kernel.ternary_matmul(x, packed, 200, scale, bias, threads=2)
            if not np.array_equal(got, want):
                errors.append(np.abs(got - want).max())

    workers = [threading.Thread(target=call) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not errors
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:  # child: exit code says whether the result was right
            ok = np.array_equal(kernel.ternary_matmul(x, packed, 200, scale, bias, threads=2), want)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
