"""GGUF weight blocks (ggml quantization types) decoded with numpy, vectorised over blocks.

Every supported type is one form: a weight is ``(code - bias) * scale + offset``, with an
unsigned integer ``code`` per weight and a ``scale`` (and, for the "_1" and K-quant types with
a minimum, an ``offset``) per sub-block of ``group_size`` weights. Block layouts follow the
GGUF / ggml format (ggml-common.h ``block_q4_0`` ... ``block_q6_K``; QK_K = 256):

* Q4_0 {d f16, qs[16]}: ``d * (q - 8)``; weight j < 16 is the low nibble of qs[j], j >= 16 the
  high nibble of qs[j - 16]. Q4_1 {d, m f16, qs[16]}: ``d * q + m``.
* Q5_0 {d, qh u32, qs[16]} / Q5_1 {d, m, qh, qs}: as Q4_x with bit j of qh as the 5th bit;
  Q5_0 subtracts 16. Q8_0 {d f16, qs int8[32]}: ``d * q``.
* Q2_K {scales[16], qs[64], d, dmin}: 16 sub-blocks of 16, ``d*sc*q - dmin*m`` (sc, m the low
  and high nibble of scales[i]); weight 128h + 32s + l is bits 2s.. of qs[32h + l].
* Q3_K {hmask[32], qs[64], scales[12], d}: 16 sub-blocks of 16, ``d*(sc - 32)*q`` with
  ``q = low 2 bits - 4 * (1 - hmask bit)``; 6-bit sc packed as ggml's ``kmask`` scheme.
* Q4_K {d, dmin, scales[12], qs[128]} / Q5_K (+ qh[32]): 8 sub-blocks of 32, ``d*sc*q - dmin*m``
  with 6-bit sc and m packed as ggml's ``get_scale_min_k4``; in each 64-weight chunk c the first
  32 weights are low nibbles of qs[32c:32c+32], the next 32 the high nibbles (Q5_K: bit 2c / 2c+1
  of qh[l] is the 5th bit).
* Q6_K {ql[128], qh[64], scales int8[16], d}: 16 sub-blocks of 16, ``d * sc * (q - 32)``.

A K-quant's super-block scale ``d`` (f16) times its 6-bit sub-block scale is exact in float32
(at most 11 + 6 significant bits), so the sub-block scale and minimum are stored expanded as
float32 without changing a single dequantized weight. ``dequantize`` rounds once per weight,
in the order ggml and the gguf package use: ``(scale * (code - bias))`` exact, then ``+ offset``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

QK_K = 256


@dataclass(frozen=True)
class BlockParts:
    """A tensor's blocks decoded into codes and per-sub-block parameters, one row per block."""

    codes: np.ndarray  # uint8 [blocks, block_size]
    scales: np.ndarray  # float16 or float32 [blocks, block_size // group_size]
    offsets: np.ndarray | None  # same dtype/shape as scales, or None (no additive term)


@dataclass(frozen=True)
class BlockFormat:
    """One ggml quantization type: sizes, code range and the block decoder."""

    name: str  # ggml's name, e.g. "Q4_K"
    type_id: int  # GGMLQuantizationType value
    block_size: int  # weights per block
    type_size: int  # bytes per block
    group_size: int  # weights per scale (sub-block)
    bits: int  # bits of a code
    bias: int  # value = code - bias
    scale_dtype: str  # "float16" (stored d) or "float32" (expanded K-quant sub-block scale)
    has_offsets: bool
    decode: Callable[[np.ndarray], BlockParts]

    @property
    def scheme_name(self) -> str:
        return f"gguf-{self.name.lower()}"

    @property
    def bits_per_weight(self) -> float:
        """As stored in the GGUF file."""
        return self.type_size * 8 / self.block_size


def _f16(raw: np.ndarray) -> np.ndarray:
    """[blocks, 2] bytes -> float16 [blocks, 1] (little-endian, as GGUF stores it)."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float16)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32]: low nibbles then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """[blocks, 4] bytes (a little-endian u32) -> [blocks, 32] bits, bit j for weight j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")


def _q4_0(b: np.ndarray) -> BlockParts:
    return BlockParts(_nibbles32(b[:, 2:18]), _f16(b[:, 0:2]), None)


def _q4_1(b: np.ndarray) -> BlockParts:
    return BlockParts(_nibbles32(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4]))


def _q5_0(b: np.ndarray) -> BlockParts:
    return BlockParts(_nibbles32(b[:, 6:22]) | (_high_bits32(b[:, 2:6]) << 4), _f16(b[:, 0:2]), None)


def _q5_1(b: np.ndarray) -> BlockParts:
    return BlockParts(_nibbles32(b[:, 8:24]) | (_high_bits32(b[:, 4:8]) << 4), _f16(b[:, 0:2]), _f16(b[:, 2:4]))


def _q8_0(b: np.ndarray) -> BlockParts:
    return BlockParts((b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, 0:2]), None)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _crumbs128(qs: np.ndarray) -> np.ndarray:
    """[blocks, 64] bytes -> [blocks, 256] 2-bit fields: weight 128h + 32s + l is bits 2s of qs[32h + l]."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _q2_k(b: np.ndarray) -> BlockParts:
    sc, d, dmin = b[:, 0:16], _f32(_f16(b[:, 80:82])), _f32(_f16(b[:, 82:84]))
    return BlockParts(_crumbs128(b[:, 16:80]), d * _f32(sc & 0x0F), -(dmin * _f32(sc >> 4)))


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """[blocks, 12] -> [blocks, 16] signed 6-bit sub-block scales (already minus 32)."""
    low = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)
    high = ((s[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)) & 3).reshape(-1, 16)
    return (low | (high << 4)).astype(np.int16) - 32


def _q3_k(b: np.ndarray) -> BlockParts:
    hmask, qs, d = b[:, 0:32], b[:, 32:96], _f32(_f16(b[:, 108:110]))
    high = ((hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    codes = _crumbs128(qs) | (high << 2)  # code = q + 4: high bit set means no -4
    return BlockParts(codes, d * _f32(_q3_k_scales(b[:, 96:108])), None)


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[blocks, 12] -> (sc, m) [blocks, 8], 6 bits each (ggml get_scale_min_k4)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 128] -> [blocks, 256]: per 64-weight chunk, 32 low nibbles then 32 high."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, QK_K)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = _f32(_f16(b[:, 0:2])), _f32(_f16(b[:, 2:4]))
    sc, m = _k4_scale_min(b[:, 4:16])
    return d * _f32(sc), -(dmin * _f32(m))


def _q4_k(b: np.ndarray) -> BlockParts:
    return BlockParts(_k4_nibbles(b[:, 16:144]), *_k_scales(b))


def _q5_k(b: np.ndarray) -> BlockParts:
    qh = b[:, 16:48]
    high = ((qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    return BlockParts(_k4_nibbles(b[:, 48:176]) | (high << 4), *_k_scales(b))


def _q6_k(b: np.ndarray) -> BlockParts:
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc, d = b[:, 192:208].view(np.int8), _f32(_f16(b[:, 208:210]))
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # [b, half, 2, 64]
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # [b, half, 4, 32]
    codes = low.reshape(-1, 2, 4, 32) | (high << 4)
    return BlockParts(codes.reshape(-1, QK_K), d * _f32(sc), None)


FORMATS: dict[str, BlockFormat] = {f.name: f for f in (
    BlockFormat("Q4_0", 2, 32, 18, 32, 4, 8, "float16", False, _q4_0),
    BlockFormat("Q4_1", 3, 32, 20, 32, 4, 0, "float16", True, _q4_1),
    BlockFormat("Q5_0", 6, 32, 22, 32, 5, 16, "float16", False, _q5_0),
    BlockFormat("Q5_1", 7, 32, 24, 32, 5, 0, "float16", True, _q5_1),
    BlockFormat("Q8_0", 8, 32, 34, 32, 8, 128, "float16", False, _q8_0),
    BlockFormat("Q2_K", 10, QK_K, 84, 16, 2, 0, "float32", True, _q2_k),
    BlockFormat("Q3_K", 11, QK_K, 110, 16, 3, 4, "float32", False, _q3_k),
    BlockFormat("Q4_K", 12, QK_K, 144, 32, 4, 0, "float32", True, _q4_k),
    BlockFormat("Q5_K", 13, QK_K, 176, 32, 5, 0, "float32", True, _q5_k),
    BlockFormat("Q6_K", 14, QK_K, 210, 16, 6, 32, "float32", False, _q6_k),
)}
BY_TYPE_ID: dict[int, BlockFormat] = {f.type_id: f for f in FORMATS.values()}


class UnsupportedBlockType(ValueError):
    """A GGUF tensor type bitsmith does not decode (names the type and the supported ones)."""


def format_of(type_id: int, type_name: str = "") -> BlockFormat:
    try:
        return BY_TYPE_ID[int(type_id)]
    except KeyError:
        raise UnsupportedBlockType(f"GGUF tensor type {type_name or type_id} is not supported; "
                                   f"supported: F32, F16, BF16, {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class QuantizedRows:
    """A quantized [rows, cols] GGUF matrix decoded to codes [rows, cols] and per-sub-block
    scales/offsets [rows, cols // group_size] (blocks run along a row)."""

    fmt: BlockFormat
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None

    def take_rows(self, order: np.ndarray) -> "QuantizedRows":
        """Rows permuted (e.g. the llama Q/K head layout): exact, blocks never span rows."""
        return QuantizedRows(self.fmt, self.codes[order], self.scales[order],
                             None if self.offsets is None else self.offsets[order])

    def dequantize(self) -> np.ndarray:
        gs = self.fmt.group_size
        rows, cols = self.codes.shape
        # in place: one float32 array for the whole matrix (a second one costs its page faults)
        w = self.codes.astype(np.float32).reshape(rows, -1, gs)
        if self.fmt.bias:
            w -= np.float32(self.fmt.bias)
        w *= self.scales.astype(np.float32)[:, :, None]
        if self.offsets is not None:
            w += self.offsets.astype(np.float32)[:, :, None]
        return w.reshape(rows, cols)


def decode_rows(fmt: BlockFormat, raw: np.ndarray, rows: int, cols: int) -> QuantizedRows:
    """``raw``: the tensor's bytes (any shape, ``rows * cols / block_size * type_size`` of them)."""
    if cols % fmt.block_size:
        raise UnsupportedBlockType(f"{fmt.name}: a row of {cols} weights is not whole blocks of {fmt.block_size}")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, fmt.type_size)
    if blocks.shape[0] * fmt.block_size != rows * cols:
        raise UnsupportedBlockType(f"{fmt.name}: {blocks.shape[0]} blocks do not hold {rows}x{cols} weights")
    parts = fmt.decode(blocks)
    groups = cols // fmt.group_size
    return QuantizedRows(fmt, parts.codes.reshape(rows, cols), parts.scales.reshape(rows, groups),
                         None if parts.offsets is None else parts.offsets.reshape(rows, groups))
