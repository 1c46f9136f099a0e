"""Every qlinear weight format as unsigned integers with a per-group offset.

The LUT engine multiplies activations by bit planes of unsigned integers, so each format is
rewritten exactly as ``w[n, k] = s[n, g] * (u[n, k] - o[n, g])`` with ``0 <= u < 2**planes``:

* rtn-intK (asymmetric): ``u`` = code, ``o`` = zero point, K planes.
* every symmetric grid scheme (rtn-intK-sym, fp3/fp4, BitMoD): ``u = v - min(grid)`` where ``v``
  is the group's integer grid value, ``o = -min(grid)`` of the group's grid; planes =
  bits of the largest grid range among the scheme's candidates (bitmod-w4: range 28 -> 5).
* outliers replace the decoded value (see ``bitsmith.ir.quantized.dequantize``): their ``u`` is
  set to ``o`` so the lookup part contributes exactly 0 and a correction adds ``val * x``.
* schemes with float per-group offsets (GGUF Q4_1 ``m``, K-quants ``-dmin*m``) add ``f[n, g]``:
  ``w = s * (u - o) + f``. The engine already multiplies each group's activation sum by a
  per-row coefficient (SCALE's ``so``), so the offset costs nothing: ``so = s*o - f``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ...errors import UnsupportedOpError
from ...ir.quant_grids import Scheme, get_scheme
from ...ir.code_packing import group_count, group_index, unpack_codes
from ...ir.quantized import operand_types, parse_sparsity

TARGET = "lut-cpu"


@dataclass(frozen=True)
class IntegerWeight:
    """``w = scales[:, g] * (u - offsets[:, g]) + float_offsets[:, g]`` (the last term only for
    schemes with float offsets) plus outliers that replace single weights."""

    u: np.ndarray            # uint8 [N, K]
    offsets: np.ndarray      # int32 [N, G]
    scales: np.ndarray       # float32 [N, G]
    planes: int
    group_size: int
    outlier_rows: np.ndarray  # int32 [nnz]
    outlier_cols: np.ndarray  # int32 [nnz]
    outlier_values: np.ndarray  # float32 [nnz]
    float_offsets: np.ndarray | None = None  # float32 [N, G]

    def dense(self) -> np.ndarray:
        """The float32 weight this form stands for (the test oracle's view)."""
        gi = group_index(self.u.shape[1], self.group_size)
        w = self.scales[:, gi] * (self.u.astype(np.float32) - self.offsets[:, gi].astype(np.float32))
        if self.float_offsets is not None:
            w = w + self.float_offsets[:, gi]
        w[self.outlier_rows, self.outlier_cols] = self.outlier_values
        return w


def scheme_planes(scheme_name: str) -> int:
    scheme = get_scheme(scheme_name)
    if scheme.asymmetric:
        return scheme.bits
    span = max(max(g.values) - min(g.values) for g in scheme.candidates)
    return max(1, int(span).bit_length())


def native_scheme(scheme: Scheme) -> bool:
    """Whether the engine's integer form ``s * (u - o) (+ f)`` holds the scheme exactly: at most
    8 planes. lut-cpu runs the others as dense float32 on its host
    (``backends/scheme_fallback.py``)."""
    return scheme.asymmetric or max(max(g.values) - min(g.values) for g in scheme.candidates) < 256


def qlinear_reason(attrs: Mapping) -> str | None:
    """Why the engine cannot run a qlinear with these attributes (None: it can)."""
    scheme = get_scheme(attrs["scheme"])
    if not native_scheme(scheme):
        return (f"scheme {attrs['scheme']} has more than 8 bit planes "
                f"(lut-cpu's pipeline dequantizes such layers for its host)")
    if scheme.offsets and attrs["outliers"]:
        return (f"scheme {attrs['scheme']} has float offsets, which an outlier (a replaced weight) "
                "would still add; compile it without outliers")
    if parse_sparsity(attrs["sparsity"]) is not None:
        return (f"N:M sparsity ({attrs['sparsity']}) has no LUT lowering; "
                "compile without sparsity or use another target")
    if attrs["group_size"] % 4:
        return f"group_size {attrs['group_size']} is not a multiple of 4 (one table per 4 activations)"
    return None


def decompose(attrs: Mapping, operands: Sequence[np.ndarray], where: str = "") -> IntegerWeight:
    """The integer form of a qlinear's packed weight operands (everything but x and bias)."""
    scheme = get_scheme(attrs["scheme"])
    k, n, gs = attrs["in_features"], attrs["out_features"], attrs["group_size"]
    reason = qlinear_reason(attrs)
    if reason:
        raise UnsupportedOpError("qlinear", module_path=where, target=TARGET, detail=reason)
    roles = [r for r, _ in operand_types(attrs)]
    ops = dict(zip(roles, operands))
    codes = unpack_codes(ops["codes"], scheme.bits, k)
    groups = group_count(k, gs)
    gi = group_index(k, gs)
    scales = ops["scales"].astype(np.float32)
    if scheme.asymmetric:
        u = codes.astype(np.int32)
        offsets = ops["zeros"].astype(np.int32)
    else:
        width = 1 << scheme.bits
        values = np.zeros((len(scheme.candidates), width), np.int32)
        lows = np.array([min(g.values) for g in scheme.candidates], np.int32)
        for i, g in enumerate(scheme.candidates):
            values[i, :len(g.values)] = g.values
            values[i, len(g.values):] = lows[i]  # unused codes never occur; decode them to 0
        if scheme.selector_bits:
            sel = unpack_codes(ops["selectors"], scheme.selector_bits, groups).astype(np.int64)
        else:
            sel = np.zeros((n, groups), np.int64)
        u = values[sel[:, gi], codes] - lows[sel][:, gi]
        offsets = -lows[sel]
    planes = scheme_planes(attrs["scheme"])
    rows = cols = np.zeros(0, np.int32)
    vals = np.zeros(0, np.float32)
    if attrs["outliers"]:
        ov, oc, ptr = operands[len(roles):len(roles) + 3]
        rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(ptr))
        cols = oc.astype(np.int32)
        vals = ov.astype(np.float32)
        u[rows, cols] = offsets[rows, gi[cols]]
    assert u.min() >= 0 and u.max() < 1 << planes, "integer form out of plane range"
    floats = ops["offsets"].astype(np.float32) if scheme.offsets else None
    return IntegerWeight(u.astype(np.uint8), offsets.astype(np.int32), scales, planes, gs, rows, cols, vals,
                         floats)
