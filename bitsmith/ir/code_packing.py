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
    """Inverse of pack_codes for ``count`` codes per row. Whole runs of eight codes (``bits``
    bytes) are read as one little-endian word and shifted apart: a compile unpacks every weight
    of the model, and the bit-plane route took ~17 ms per SmolLM2 layer."""
    packed = np.asarray(packed, dtype=np.uint8)
    lead = packed.shape[:-1]
    whole = count // 8  # runs of 8 codes = ``bits`` whole bytes each
    if packed.shape[-1] < packed_length(count, bits):
        raise ValueError(f"{packed.shape[-1]} bytes per row cannot hold {count} {bits}-bit codes")
    if bits == 8:
        return np.ascontiguousarray(packed[..., :count])
    if bits == 4 and count % 2 == 0:
        out = np.empty(lead + (count,), dtype=np.uint8)
        out[..., 0::2] = packed[..., :count // 2] & np.uint8(15)
        out[..., 1::2] = packed[..., :count // 2] >> np.uint8(4)
        return out
    if 8 % bits == 0:  # 1, 2, 4: whole codes per byte
        per = 8 // bits
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
        nbytes = -(-count // per)
        codes = (packed[..., :nbytes, None] >> shifts) & np.uint8((1 << bits) - 1)
        return np.ascontiguousarray(codes.reshape(lead + (nbytes * per,))[..., :count])
    out = np.empty(lead + (count,), dtype=np.uint8)
    if whole:
        run = packed[..., :whole * bits].reshape(lead + (whole, bits)).astype(np.uint64)
        word = run[..., 0].copy()
        for b in range(1, bits):
            word |= run[..., b] << np.uint64(8 * b)
        shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
        codes = (word[..., None] >> shifts) & np.uint64((1 << bits) - 1)
        out[..., :whole * 8] = codes.reshape(lead + (whole * 8,))
    if count > whole * 8:  # the last, partial run: bit by bit
        tail = count - whole * 8
        stream = np.unpackbits(packed[..., whole * bits:], axis=-1, count=tail * bits, bitorder="little")
        planes = stream.reshape(lead + (tail, bits))
        out[..., whole * 8:] = (planes << np.arange(bits, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    return out


def group_count(length: int, group_size: int) -> int:
    return -(-length // group_size)


def group_index(length: int, group_size: int) -> np.ndarray:
    """Group of each position along a row; the last group may be shorter."""
    return np.arange(length) // group_size
