"""Independent scalar reference for the quantization tests: grids written out from the issue
text, bit packing as plain loops, group fitting and nearest rounding one weight at a time with
exact fractions, and the dense weight a qlinear's packed operands stand for.

Nothing here calls bitsmith's quantization code; the tests compare it against this.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

FP3 = [-4, -2, -1, 0, 1, 2, 4]
FP4 = [-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12]

# scheme -> (bits, asymmetric, candidate grids: code i means grid[i])
SCHEMES = {
    "rtn-int2": (2, True, [list(range(4))]),
    "rtn-int3": (3, True, [list(range(8))]),
    "rtn-int4": (4, True, [list(range(16))]),
    "rtn-int8": (8, True, [list(range(256))]),   # FlightLLM's 8-bit weights (issue 13)
    "rtn-int2-sym": (2, False, [list(range(-1, 2))]),
    "rtn-int3-sym": (3, False, [list(range(-3, 4))]),
    "rtn-int4-sym": (4, False, [list(range(-7, 8))]),
    "fp3": (3, False, [FP3]),
    "fp4": (4, False, [FP4]),
    # BitMoD: the negative-zero code becomes one extra value; order ER+, ER-, EA+, EA-
    "bitmod-w3": (3, False, [FP3 + [3], FP3 + [-3], FP3 + [6], FP3 + [-6]]),
    "bitmod-w4": (4, False, [FP4 + [10], FP4 + [-10], FP4 + [16], FP4 + [-16]]),
}


def fp16(x: float) -> float:
    return float(np.float16(min(x, 65504.0)))


def ref_pack(codes: list[int], bits: int) -> bytes:
    """LSB-first bit stream of the codes, zero-padded to whole bytes."""
    stream = []
    for c in codes:
        stream += [(c >> b) & 1 for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[i + j] << j for j in range(8)) for i in range(0, len(stream), 8))


def ref_unpack(packed: bytes, bits: int, count: int) -> list[int]:
    out = []
    for i in range(count):
        value = 0
        for b in range(bits):
            pos = i * bits + b
            value |= ((packed[pos // 8] >> (pos % 8)) & 1) << b
        out.append(value)
    return out


def ref_nearest(x: float, values: list[float]) -> float:
    """The value nearest to x; an exact tie goes to the smaller value."""
    best = None
    for v in sorted(values):
        if best is None or abs(Fraction(x) - Fraction(v)) < abs(Fraction(x) - Fraction(best)):
            best = v
    return best


def ref_symmetric_choice(row: list[float], keep: list[bool], grids: list[list[int]]) -> tuple[int, float, list[Fraction]]:
    """(selector, scale, errors): scale = fp16(absmax / max|grid|) per candidate, squared RTN
    error over participating weights with that stored scale, least error, ties to the first."""
    absmax = max([abs(x) for x, k in zip(row, keep) if k], default=0.0)
    errors, scales = [], []
    for grid in grids:
        s = fp16(absmax / max(abs(v) for v in grid))
        scaled = [float(np.float32(v) * np.float32(s)) for v in grid]
        err = Fraction(0)
        for x, k in zip(row, keep):
            if k:
                err += (Fraction(x) - Fraction(ref_nearest(x, scaled))) ** 2
        errors.append(err)
        scales.append(s)
    best = 0
    for i, e in enumerate(errors):
        if e < errors[best]:
            best = i
    return best, scales[best], errors


def ref_asymmetric(row: list[float], keep: list[bool], levels: int) -> tuple[float, int]:
    """(scale, zero) of min-max asymmetric quantization over the participating weights."""
    vals = [x for x, k in zip(row, keep) if k] or [0.0]
    lo, hi = min(vals), max(vals)
    s = fp16((hi - lo) / (levels - 1))
    if s == 0:
        s = fp16(max(abs(lo), abs(hi))) or 1.0
    return s, int(min(max(round(-lo / s), 0), levels - 1))


def ref_dequantize(attrs: dict, operands: list[np.ndarray]) -> np.ndarray:
    """float32 [out, in] from a qlinear's weight operands (after x, before bias), by loops."""
    bits, asymmetric, grids = SCHEMES[attrs["scheme"]]
    n_out, k, gs = attrs["out_features"], attrs["in_features"], attrs["group_size"]
    nm = tuple(int(p) for p in attrs["sparsity"].split(":")) if attrs["sparsity"] else None
    kept = k if nm is None else k // nm[1] * nm[0]
    groups = math.ceil(kept / gs)
    ops = list(operands)
    codes, scales = ops.pop(0), ops.pop(0)
    zeros = ops.pop(0) if asymmetric else None
    selectors = ops.pop(0) if len(grids) > 1 else None
    nm_index = ops.pop(0) if nm is not None else None
    weight = np.zeros((n_out, k), dtype=np.float32)
    for r in range(n_out):
        row_codes = ref_unpack(bytes(codes[r]), bits, kept)
        row_sel = ref_unpack(bytes(selectors[r]), 2, groups) if selectors is not None else [0] * groups
        row_idx = ref_unpack(bytes(nm_index[r]), max(1, int(math.log2(nm[1]))), kept) if nm else None
        for j in range(kept):
            g = j // gs
            s = np.float32(scales[r, g])
            if asymmetric:
                value = (np.float32(row_codes[j]) - np.float32(zeros[r, g])) * s
            else:
                value = np.float32(grids[row_sel[g]][row_codes[j]]) * s
            col = j if nm is None else (j // nm[0]) * nm[1] + row_idx[j]
            weight[r, col] = value
    if attrs["outliers"]:
        values, cols, rowptr = ops[:3]
        for r in range(n_out):
            for i in range(rowptr[r], rowptr[r + 1]):
                weight[r, cols[i]] = np.float32(values[i])
    return weight
