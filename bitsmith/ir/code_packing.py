"""Bit packing of quantization codes and the grouping of a row's weights: the storage layout
every quantized operand (qlinear codes, selectors, N:M indices) shares."""

from __future__ import annotations

import numpy as np


def packed_length(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs the last axis of ``codes`` densely, LSB first: code i occupies bits
    [i*bits, (i+1)*bits) of the row's little-endian bit stream (3-bit codes are not padded)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    c = codes.astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(c)
    if bits == 4 and c.shape[-1] % 2 == 0:  # the same stream, without the bit-plane temporaries
        return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
    bitplanes = (c[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [..., K, bits]
    stream = bitplanes.reshape(*c.shape[:-1], c.shape[-1] * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_codes for ``count`` codes per row."""
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=count * bits, bitorder="little")
    planes = stream.reshape(*packed.shape[:-1], count, bits).astype(np.uint8)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)


def group_count(length: int, group_size: int) -> int:
    return -(-length // group_size)


def group_index(length: int, group_size: int) -> np.ndarray:
    """Group of each position along a row; the last group may be shorter."""
    return np.arange(length) // group_size
