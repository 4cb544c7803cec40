"""The native tq2k kernel: packed-ternary GEMM `y = (x @ unpack(W).T) * scale + bias` on `encoder.packing`'s
layout, and the whole encoder forward built on it (encoder/ternary_runtime.py drives it).

Paths (C sources beside this file, ggml style: one plain reference per operation, SIMD versions tested
against it):
  "reference"   plain C, any CPU
  "avx2"        AVX2 + FMA (vpmaddubsw)
  "avx512vnni"  AVX-512 F/BW/VL + VNNI (vpdpbusd) for the GEMM, AVX2 for the other operations
  "avx512f32"   AVX-512F with float activations: GEMM only, forced-only (never chosen by default), see below
The best int8 path this CPU supports (CPUID, at run time) is used unless the caller names one (`path=`; the
app passes TERNREC_KERNEL_PATH). `checked_path(name)` runs a path once against the reference before an encoder
relies on it.

Activations: the int8 paths quantize them to int8 with one scale (absmax / 127) per row and group of 64
inputs (tq2k.h says why); the integer products are exact, so the only error against float math on the
unpacked weights is that rounding, at most half a step per input:
|y - y_float| <= 0.5 * absmax(x_row)/127 * scale[n] * nnz(W[n]). Keeping them float ("avx512f32") is
float-accurate but does 16 multiply-adds per instruction instead of VNNI's 64, and measured ~8x slower per
core on the MiniLM shapes, so int8 is the default.
Threads: `set_num_threads(n)` (default 2) for calls that do not pass their own: the caller plus persistent
helper threads that share work without a join (tq2k_pool.c); the GIL is released.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from encoder.packing import pack_ternary, packed_nbytes

try:
    from encoder.kernel import _tq2k
except ImportError as exc:  # not built: the error says how to build it
    _tq2k = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

PATHS = ("reference", "avx2", "avx512vnni", "avx512f32")  # index = the C path id
FLOAT_ACTIVATION_PATHS = ("avx512f32",)
_threads = 2
_checked: dict[str, bool] = {}


def _lib():
    if _tq2k is None:
        raise ImportError(f"the native kernel encoder.kernel._tq2k is not built ({_IMPORT_ERROR}); "
                          "run `pip install -e .`")
    return _tq2k


def available_paths() -> list[str]:
    """Paths this CPU can run, best first ("reference" always last)."""
    return list(_lib().available_paths())


def default_path() -> str:
    """The int8 path this CPU runs best."""
    return next(p for p in available_paths() if p not in FLOAT_ACTIVATION_PATHS)


def path_id(path: str | None) -> int:
    name = default_path() if path is None else path
    if name not in PATHS:
        raise ValueError(f"unknown kernel path {name!r}; expected one of {PATHS}")
    if name not in available_paths():
        raise RuntimeError(f"kernel path {name!r} is not supported by this CPU (have {available_paths()})")
    return PATHS.index(name)


def set_num_threads(n: int) -> None:
    global _threads
    if n < 1:
        raise ValueError("threads must be >= 1")
    _threads = int(n)


def get_num_threads() -> int:
    return _threads


def gemm_raw(x_ptr: int, rows: int, in_features: int, w_ptr: int, out_features: int, scale_ptr: int,
             bias_ptr: int, y_ptr: int, path: int, threads: int) -> None:
    """Unchecked call on raw addresses (contiguous float32 x/scale/bias/y, packed uint8 w)."""
    _lib().gemm(x_ptr, rows, in_features, w_ptr, out_features, scale_ptr, bias_ptr, y_ptr, path, threads)


def _c_array(a, dtype, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def ternary_matmul(x: np.ndarray, packed: np.ndarray, out_features: int, scale: np.ndarray,
                   bias: np.ndarray | None = None, path: str | None = None, threads: int | None = None,
                   ) -> np.ndarray:
    """x float32 (rows, in_features), packed from `pack_ternary` -> float32 (rows, out_features)."""
    x = _c_array(x, np.float32, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, in_features), got shape {x.shape}")
    rows, in_features = x.shape
    packed = _c_array(packed, np.uint8, "packed")
    if packed.size != packed_nbytes(out_features, in_features):
        raise ValueError(f"packed has {packed.size} bytes, expected {packed_nbytes(out_features, in_features)}")
    scale = _c_array(scale, np.float32, "scale")
    if scale.shape != (out_features,):
        raise ValueError(f"scale must have shape ({out_features},), got {scale.shape}")
    if bias is not None:
        bias = _c_array(bias, np.float32, "bias")
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {bias.shape}")
    y = np.empty((rows, out_features), np.float32)
    gemm_raw(x.ctypes.data, rows, in_features, packed.ctypes.data, out_features, scale.ctypes.data,
             0 if bias is None else bias.ctypes.data, y.ctypes.data, path_id(path),
             _threads if threads is None else int(threads))
    return y


def checked_path(path: str | None = None) -> str:
    """`path` (default: the best int8 one) after a one-time comparison of its GEMM with the reference on a
    random odd shape; a path that disagrees (the AVX-512 ones cannot be tested on every machine) is reported
    with a RuntimeWarning and the next available int8 path is checked instead."""
    candidates = [p for p in available_paths() if p not in FLOAT_ACTIVATION_PATHS]
    if path is not None:
        path_id(path)  # unknown or unsupported: a clear error
        if path in FLOAT_ACTIVATION_PATHS:
            raise ValueError(f"kernel path {path!r} keeps activations float: it runs single GEMMs, not the encoder")
        candidates = candidates[candidates.index(path):]
    for name in candidates:
        if name not in _checked:
            rng = np.random.default_rng(0)
            codes = rng.integers(-1, 2, size=(70, 201)).astype(np.int8)
            x = rng.standard_normal((11, 201)).astype(np.float32)
            scale, bias = rng.uniform(0.1, 1, 70).astype(np.float32), rng.standard_normal(70).astype(np.float32)
            packed = pack_ternary(codes)
            got = ternary_matmul(x, packed, 70, scale, bias, path=name, threads=2)
            want = ternary_matmul(x, packed, 70, scale, bias, path="reference", threads=1)
            _checked[name] = bool(np.allclose(got, want, rtol=1e-5, atol=1e-4))
        if _checked[name]:
            return name
        warnings.warn(f"kernel path {name!r} disagrees with the reference on this CPU; not using it",
                      RuntimeWarning, stacklevel=2)
    raise RuntimeError("no kernel path agrees with the reference")  # the reference is always last


def peak_macs_per_second(threads: int, seconds: float = 0.5) -> float:
    """Measured vpmaddubsw multiply-add throughput (tq2k_peak.c) on `threads` threads; 0.0 without AVX2."""
    lib = _lib()
    iters = 1 << 20
    while True:  # grow the loop until it runs long enough to time
        t = time.perf_counter()
        macs = lib.peak_avx2(iters, threads)
        if macs == 0.0 or time.perf_counter() - t >= seconds:
            return macs
        iters *= 2
