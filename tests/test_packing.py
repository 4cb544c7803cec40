"""Packed 2-bit ternary format: round trips, padding, and the documented bit positions."""

import numpy as np
import pytest

from encoder.packing import pack_ternary, packed_nbytes, padded_shape, unpack_ternary

SHAPES = [(1, 1), (1, 3), (3, 1), (16, 16), (17, 65), (65, 383), (384, 384), (383, 1000), (1536, 384)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    codes = rng.integers(-1, 2, size=shape).astype(np.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.nbytes == packed_nbytes(*shape)
    n_pad, k_pad = padded_shape(*shape)
    assert packed.nbytes == n_pad * k_pad // 4  # exactly 2 bits per (padded) weight
    back = unpack_ternary(packed, *shape)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)


def test_documented_bit_positions():
    # Weight (n, k) lives in tile (n//16, k//16), byte (n%16)*4 + k%4, bits 2*((k%16)//4); value code+1.
    out_f, in_f = 20, 40
    n, k = 18, 37
    codes = np.zeros((out_f, in_f), np.int8)
    codes[n, k] = 1
    packed = pack_ternary(codes)
    k_tiles = padded_shape(out_f, in_f)[1] // 16
    offset = ((n // 16) * k_tiles + k // 16) * 64 + (n % 16) * 4 + k % 4
    shift = 2 * ((k % 16) // 4)
    assert (packed[offset] >> shift) & 3 == 2
    zero_code_bytes = np.delete(packed, offset)
    assert (zero_code_bytes == 0b01010101).all()  # every other weight, padding included, is code 0
    keep = 0xFF ^ (3 << shift)
    assert int(packed[offset]) & keep == 0b01010101 & keep


def test_padding_is_deterministic():
    a = pack_ternary(np.full((5, 7), -1, np.int8))
    b = pack_ternary(np.full((5, 7), -1, np.int8))
    np.testing.assert_array_equal(a, b)
    assert a.nbytes == 16 * 16 // 4


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_ternary(np.array([[2, 0]], np.int8))
    with pytest.raises(ValueError):
        pack_ternary(np.zeros(4, np.int8))
    with pytest.raises(ValueError):
        unpack_ternary(np.zeros(10, np.uint8), 16, 16)
    with pytest.raises(ValueError):
        unpack_ternary(np.full(64, 0xFF, np.uint8), 16, 16)  # 2-bit value 3 is invalid
