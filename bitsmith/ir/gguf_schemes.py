"""The ``gguf-*`` qlinear schemes: a GGUF file's quantized blocks kept bit-exactly.

Each ggml type of ``bitsmith.gguf.FORMATS`` becomes one scheme named ``gguf-<type>``
(``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q8_0``, ``gguf-q4_k``, ...): one grid whose code ``c``
means ``c - bias`` (Q4_0: -8..7, Q8_0: -128..127, Q6_K: -32..31, Q4_1/Q4_K: 0..15), groups of
the type's sub-block (32, or 16 for Q2_K/Q3_K/Q6_K), scales as stored (float16 ``d`` for the
legacy types) or expanded exactly to float32 per sub-block (K-quants: ``d * sc``), and for the
types with a minimum an ``offsets`` operand (Q4_1: ``m``; K-quants: ``-dmin * m``, float32).
So ``grid[code] * scale + offset`` equals ggml's dequantization bit for bit.

Storage is honest about the expansion: a K-quant's qlinear holds codes at the type's bits plus
a float32 scale (and offset) per sub-block, e.g. Q4_K 4 + 64/32 = 6 bits per weight against
the file's 4.5 (``storage_bits_per_weight``); the legacy types match the file exactly except
Q8_0's codes and scale (8 + 16/32 = 8.5, as in the file).
"""

from __future__ import annotations

from ..gguf.blocks import FORMATS, BlockFormat
from .quant_grids import Grid, Scheme, register_scheme


def _scheme(fmt: BlockFormat) -> Scheme:
    grid = Grid(fmt.scheme_name, fmt.bits, tuple(range(-fmt.bias, (1 << fmt.bits) - fmt.bias)))
    return Scheme(fmt.scheme_name, (grid,), scale_dtype=fmt.scale_dtype, offsets=fmt.has_offsets,
                  block_size=fmt.group_size)


GGUF_SCHEMES: dict[str, Scheme] = {f.name: register_scheme(_scheme(f)) for f in FORMATS.values()}


def storage_bits_per_weight(scheme: Scheme) -> float:
    """Bits per weight of a qlinear in this scheme: codes plus per-group scale and offset."""
    per_group = (16 if scheme.scale_dtype == "float16" else 32) * (2 if scheme.offsets else 1)
    return scheme.bits + per_group / (scheme.block_size or 1)
