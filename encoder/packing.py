"""Packed 2-bit ternary weight format ("tq2k", FORMAT_VERSION 1): the native kernel's own layout.

A ternary linear layer is `W_hat = scale[:, None] * codes`, codes int8 (out_features, in_features) in
{-1, 0, +1}, one float32 scale per output row (stored beside the packed bytes, not in them). This
module defines how `codes` are stored: 2 bits per weight, 4 weights per byte, plain numpy reference
code (`pack_ternary` / `unpack_ternary`); the C kernel (encoder/kernel/) reads these bytes as is.

Padding (deterministic from the shape):
    N_pad = ceil(out_features / 16) * 16,  K_pad = ceil(in_features / 16) * 16
    padded weights are code 0.  Packed size = N_pad * K_pad / 4 bytes, returned as a 1-D uint8 array.

2-bit value of a weight = code + 1:  0 -> -1,  1 -> 0,  2 -> +1   (3 is invalid).

Blocks: the padded matrix is cut into tiles of 16 output rows x 16 input columns. Tiles are stored
output-block-major: tile (nb, kc) (nb = n // 16, kc = k // 16) is the 64 bytes at offset
`(nb * K_pad/16 + kc) * 64`. Inside a tile, byte i (0..63) and bit pair s (0..3, bits 2s..2s+1) hold

    n = nb*16 + i // 4,   k = kc*16 + 4*s + i % 4

Why this layout: `(tile >> 2s) & 3` over the 64 bytes of a tile gives, in one 512-bit register, 16
output rows x 4 consecutive inputs as unsigned bytes in {0, 1, 2} -- exactly the u8 operand of
AVX-512 VNNI `vpdpbusd` against 4 int8 activations broadcast to every lane (each 32-bit lane = one
output row). Storing code + 1 means no decode step: the kernel subtracts sum(x_q) per row once.
AVX2 uses the two 32-byte halves (8 output rows each) with `vpmaddubsw` + `vpmaddwd`.
One output block's tiles are contiguous, so a thread working on a block streams its weights.
"""

from __future__ import annotations

import numpy as np

FORMAT = "tq2k"
FORMAT_VERSION = 1
BLOCK_OUT = 16  # output rows per tile (one 32-bit lane each in a 512-bit register)
BLOCK_IN = 16  # inputs per tile (4 bit pairs x 4 bytes per lane)
TILE_BYTES = BLOCK_OUT * BLOCK_IN // 4


def padded_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """(N_pad, K_pad): the shape the packed bytes cover, padding included."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"shape must be positive, got ({out_features}, {in_features})")
    return -(-out_features // BLOCK_OUT) * BLOCK_OUT, -(-in_features // BLOCK_IN) * BLOCK_IN


def packed_nbytes(out_features: int, in_features: int) -> int:
    n_pad, k_pad = padded_shape(out_features, in_features)
    return n_pad * k_pad // 4


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """codes int8 (out_features, in_features) in {-1, 0, 1} -> 1-D uint8 of `packed_nbytes` bytes."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise TypeError(f"codes must be an integer array in {{-1, 0, 1}}, got {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be in {-1, 0, 1}")
    n, k = codes.shape
    n_pad, k_pad = padded_shape(n, k)
    two = np.ones((n_pad, k_pad), dtype=np.uint8)  # 1 = code 0: the padding value
    two[:n, :k] = (codes + 1).astype(np.uint8)
    # (nb, n_local, kc, s, k_local) -> (nb, kc, n_local, k_local, s): byte i = n_local*4 + k_local
    t = two.reshape(n_pad // 16, 16, k_pad // 16, 4, 4).transpose(0, 2, 1, 4, 3)
    t = t.reshape(n_pad // 16, k_pad // 16, 64, 4)
    packed = t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6)
    return np.ascontiguousarray(packed.reshape(-1), dtype=np.uint8)


def unpack_ternary(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """Inverse of `pack_ternary`: -> int8 (out_features, in_features) in {-1, 0, 1}."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    n_pad, k_pad = padded_shape(out_features, in_features)
    if packed.size != n_pad * k_pad // 4:
        raise ValueError(f"packed has {packed.size} bytes, expected {n_pad * k_pad // 4} for "
                         f"({out_features}, {in_features})")
    b = packed.reshape(n_pad // 16, k_pad // 16, 64)
    t = np.stack([(b >> (2 * s)) & 3 for s in range(4)], axis=-1)  # (nb, kc, i, s)
    if (t == 3).any():
        raise ValueError("packed ternary data holds the invalid 2-bit value 3")
    t = t.reshape(n_pad // 16, k_pad // 16, 16, 4, 4).transpose(0, 2, 1, 4, 3).reshape(n_pad, k_pad)
    return (t[:out_features, :in_features].astype(np.int8) - 1).astype(np.int8)
