"""Native packed-ternary GEMM: `y = (x @ unpack(W).T) * scale + bias` on `encoder.packing`'s layout.

Paths (C sources beside this file, ggml style: one plain reference, SIMD versions tested against it):
  "reference"   plain C, any CPU
  "avx2"        AVX2 + FMA (vpmaddubsw / vpmaddwd)
  "avx512vnni"  AVX-512 F/BW/VL + VNNI (vpdpbusd)
  "avx512f32"   AVX-512F with float activations: forced-only (never chosen by default), see below
The best one this CPU supports (CPUID, at run time) is used unless a path is forced with `path=` or
the TERNREC_KERNEL_PATH environment variable.

Activations: the default paths quantize them on the fly to int8 with one scale (absmax / 127) per row
and group of 64 inputs (per-row scales lose too much to LayerNorm's outlier channels, see tq2k.h); the
integer products are exact, so the only error against float math on the unpacked weights is that
rounding, at most half a step per input: |y - y_float| <= 0.5 * absmax(x_row)/127 * scale[n] * nnz(W[n]).
Keeping them float ("avx512f32") is float-accurate but does 16 multiply-adds per instruction instead of
VNNI's 64, and measured ~8x slower per core on the MiniLM shapes (bench/kernel.py, BENCHMARKS.md), so
int8 is the default.
Threads: `set_num_threads(n)`, default TERNREC_KERNEL_THREADS or 2 (the caller plus persistent helper threads
that share work without a join, see tq2k_pool.c); the GIL is released.
"""

from __future__ import annotations

import numpy as np

from encoder.packing import packed_nbytes
from ingest.settings import Settings

try:
    from encoder.kernel import _tq2k
except ImportError as exc:  # not built: callers (e.g. the ternary encoder) fall back to float
    _tq2k = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

PATHS = ("reference", "avx2", "avx512vnni", "avx512f32")  # index = the C path id
FLOAT_ACTIVATION_PATHS = ("avx512f32",)
_threads = Settings().kernel_threads


def _lib():
    if _tq2k is None:
        raise ImportError(f"the native kernel encoder.kernel._tq2k is not built ({_IMPORT_ERROR}); "
                          "run `pip install -e .`")
    return _tq2k


def available_paths() -> list[str]:
    """Paths this CPU can run, best first ("reference" always last)."""
    return list(_lib().available_paths())


def default_path() -> str:
    forced = Settings().kernel_path
    if forced:
        return forced
    return available_paths()[0]  # the int8 path this CPU runs best


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
