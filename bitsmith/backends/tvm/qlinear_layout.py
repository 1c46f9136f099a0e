"""Kernel-ready operands of a ``qlinear``: the packed codes re-laid out so a vector of 16
consecutive codes comes out of 16 aligned bytes with one shift and one mask.

Layout "sliced16" of a stream of ``b``-bit fields (b in 1, 2, 4, 8; ``P = 8 // b`` fields per
byte): the stream is cut into chunks of ``16 * P`` fields stored in 16 bytes; field ``h * 16 + j``
of a chunk sits in bits ``[b*h, b*h + b)`` of byte ``j``. So lane ``j`` of a 16-lane vector reads
byte ``j`` for every ``h``: a contiguous 16-byte load, a shift by the constant ``b*h``, a mask. Rows
are zero-padded to whole chunks (padding is never read as a weight: loops stop at the row length).

* 2- and 4-bit codes: one sliced16 stream (exactly 2 / 4 bits per code plus row padding).
* 3-bit codes: split into a 2-bit stream of the low bits and a 1-bit stream of the high bit
  (3 bits per code in memory, like the IR's dense stream, but no code straddles a byte, so
  decoding needs no unaligned 16-bit reads and vectorizes).
* N:M index codes: a sliced16 stream at log2(M) bits rounded up to 1/2/4/8 (3-bit indices
  of M = 8 are stored in 4 bits: it is metadata read once per kept weight).
* Grid values (symmetric and BitMoD schemes): a small int8 table ``[candidates, 16]`` (grid
  values are integers with |v| <= 16); selectors are unpacked to one byte per group.
* Affine grids (one grid holding every code's value consecutively, ``value = code + low``: the
  GGUF types, e.g. Q4_1 0..15, Q8_0 -128..127) need no table: the kernel adds the constant
  ``low``. 5- to 8-bit codes use one 8-bit stream (a byte per code). Scales keep the scheme's
  dtype (float16, or float32 for K-quants); float per-group ``offsets`` (Q4_1 ``m``,
  K-quants ``-dmin*m``) are a kernel operand of the same shape and dtype, added after scaling.
* Outliers: the IR's CSR (cols int32, rowptr int32 [out+1]) is kept; its fp16 values become
  float32 *corrections* ``value - decoded(row, col)``. The reference (``quantized.dequantize``)
  *replaces* the decoded weight at an outlier position, so adding the correction gives the same
  weight (to float32 rounding of one addition) without a dense weight matrix. With no outlier
  at all, one dummy entry (col 0, 0.0) that no row points at keeps the arrays non-empty.
  ``outlier_width`` (the most outliers in one row) bounds the reduction of the unscheduled
  definition; CPU kernels loop over each row's exact range.

No dense float weight matrix is built: decoding of the few outlier positions aside, only
integer codes are reshuffled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from ...ir.quant_grids import Scheme, get_scheme
from ...ir.code_packing import group_count, unpack_codes
from ...ir.quantized import index_bits, kept_per_row, operand_types, parse_sparsity

LANES = 16  # bytes per chunk = vector lanes of one decode


def field_width(bits: int) -> int:
    """Smallest of 1, 2, 4, 8 that holds ``bits``."""
    for w in (1, 2, 4, 8):
        if bits <= w:
            return w
    raise BitsmithError(f"{bits}-bit fields are not supported by the tvm qlinear kernels")


def chunk_fields(width: int) -> int:
    return LANES * (8 // width)


def sliced_length(count: int, width: int) -> int:
    """Bytes per row of ``count`` fields of ``width`` bits in layout sliced16."""
    return -(-count // chunk_fields(width)) * LANES


def pack_sliced(fields: np.ndarray, width: int) -> np.ndarray:
    """uint8 [rows, sliced_length]: fields [rows, count] (values < 2**width) in layout sliced16."""
    rows, count = fields.shape
    per_byte, cf = 8 // width, chunk_fields(width)
    chunks = -(-count // cf)
    padded = np.zeros((rows, chunks * cf), dtype=np.uint8)
    padded[:, :count] = fields
    f = padded.reshape(rows, chunks, per_byte, LANES)  # [row, chunk, h, j]; width * per_byte == 8
    out = f[:, :, 0, :].copy()
    for h in range(1, per_byte):
        out |= f[:, :, h, :] << np.uint8(width * h)
    return out.reshape(rows, chunks * LANES)


def unpack_sliced(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_sliced`."""
    rows = packed.shape[0]
    per_byte = 8 // width
    b = packed.reshape(rows, -1, 1, LANES)
    shifts = (np.arange(per_byte, dtype=np.uint8) * width).reshape(1, 1, per_byte, 1)
    f = (b >> shifts) & ((1 << width) - 1)
    return f.reshape(rows, -1)[:, :count].astype(np.uint8)


@dataclass(frozen=True)
class QLinearLayout:
    """Everything the kernel generators need to know about one qlinear's operands."""

    in_features: int
    out_features: int
    group_size: int
    scheme: str
    bits: int
    kept: int  # weights stored per row
    groups: int
    asymmetric: bool
    candidates: int  # rows of the grid table (0 for asymmetric schemes)
    has_selectors: bool
    nm: tuple[int, int] | None  # (N, M)
    nm_width: int  # field width of the N:M index stream (0 without sparsity)
    outlier_width: int  # most outliers in one row (0 without outliers)
    has_bias: bool
    affine: bool = False  # value = code + grid_low (no grid table)
    grid_low: int = 0
    offsets: bool = False  # float per-group offsets added after scaling
    scale_dtype: str = "float16"

    @property
    def code_streams(self) -> tuple[tuple[int, int], ...]:
        """(field width, shift into the code) of each code stream, low bits first."""
        if self.bits > 4:
            return ((8, 0),)
        if self.bits == 3:
            return ((2, 0), (1, 2))
        return ((self.bits, 0),)

    def roles(self) -> list[str]:
        """Names of the kernel operands, in order."""
        out = [f"codes{i}" for i in range(len(self.code_streams))] + ["scales"]
        if self.asymmetric:
            out.append("zeros")
        elif not self.affine:
            out.append("grid")
        if self.offsets:
            out.append("offsets")
        if self.has_selectors:
            out.append("selectors")
        if self.nm is not None:
            out.append("nm_index")
        if self.outlier_width:
            out += ["outlier_cols", "outlier_corrections", "outlier_rowptr"]
        if self.has_bias:
            out.append("bias")
        return out

    def as_attrs(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["nm"] = f"{self.nm[0]}:{self.nm[1]}" if self.nm else ""
        return d


def _check_attrs(attrs: Mapping[str, Any]) -> None:
    missing = {"scheme", "group_size", "in_features", "out_features", "sparsity", "outliers", "bias"} - set(attrs)
    if missing:
        raise BitsmithError(f"qlinear attributes lack {sorted(missing)}")


def native_scheme(scheme: Scheme) -> bool:
    """Whether every tvm target's kernels (CUDA's too) decode this scheme: 2/3/4-bit codes,
    float16 scales, no float offsets, grid values in the int8 table (asymmetric schemes use zero
    points instead). The tvm targets run the others as dense float32
    (``backends/scheme_fallback.py``)."""
    if scheme.bits not in (2, 3, 4) or scheme.offsets or scheme.scale_dtype != "float16":
        return False
    return scheme.asymmetric or all(-128 <= v <= 127 for g in scheme.candidates for v in g.values)


def affine_low(scheme: Scheme) -> int | None:
    """``low`` when the scheme's one grid is ``code + low`` for every code (the GGUF types),
    else None: such a grid decodes with one add and needs no table, at any width."""
    if scheme.asymmetric or len(scheme.candidates) != 1:
        return None
    values = scheme.candidates[0].values
    low = values[0]
    return low if tuple(values) == tuple(range(low, low + (1 << scheme.bits))) else None


def native_scheme_llvm(scheme: Scheme) -> bool:
    """What the CPU kernels decode: ``native_scheme``, plus 8-bit asymmetric codes (rtn-int8,
    the default lm_head), affine grids up to 8 bits (every GGUF type: Q4_1, Q8_0, K-quants),
    float per-group offsets and float32 scales (``matmul_defs.qlinear_func``,
    ``matmul_cpu_kernels.qlinear_kernel``)."""
    if native_scheme(scheme):
        return True
    if scheme.scale_dtype not in ("float16", "float32") or scheme.bits > 8:
        return False
    if scheme.asymmetric:
        return not scheme.offsets
    return affine_low(scheme) is not None or (
        scheme.bits <= 4 and all(-128 <= v <= 127 for g in scheme.candidates for v in g.values))


def gather_native(scheme: Scheme) -> bool:
    """What the CPU gather of a tied table's packed rows decodes (``packed_gather.py``): codes one
    per byte whose value is an integer difference, 8-bit asymmetric (rtn-int8) or affine (Q8_0)."""
    if scheme.bits != 8 or scheme.scale_dtype not in ("float16", "float32"):
        return False
    return (scheme.asymmetric and not scheme.offsets) or affine_low(scheme) is not None


def layout_from_attrs(a: Mapping[str, Any]) -> QLinearLayout:
    """The layout a kernel definition records (``QLinearLayout.as_attrs``, values as TVM or Python scalars)."""
    nm = str(a["nm"])
    return QLinearLayout(
        in_features=int(a["in_features"]), out_features=int(a["out_features"]),
        group_size=int(a["group_size"]), scheme=str(a["scheme"]), bits=int(a["bits"]), kept=int(a["kept"]),
        groups=int(a["groups"]), asymmetric=bool(a["asymmetric"]), candidates=int(a["candidates"]),
        has_selectors=bool(a["has_selectors"]), nm=tuple(int(p) for p in nm.split(":")) if nm else None,
        nm_width=int(a["nm_width"]), outlier_width=int(a["outlier_width"]), has_bias=bool(a["has_bias"]),
        affine=bool(a["affine"]), grid_low=int(a["grid_low"]), offsets=bool(a["offsets"]),
        scale_dtype=str(a["scale_dtype"]))


def layout_for(attrs: Mapping[str, Any], outlier_width: int) -> QLinearLayout:
    _check_attrs(attrs)
    scheme = get_scheme(str(attrs["scheme"]))
    if not native_scheme_llvm(scheme):
        raise BitsmithError(f"qlinear scheme {scheme.name}: {scheme.bits}-bit codes, {scheme.scale_dtype} scales"
                            f"{' and float offsets' if scheme.offsets else ''} are not supported by the tvm "
                            f"kernels (the tvm pipelines dequantize such layers first)")
    low = affine_low(scheme)
    k, gs = int(attrs["in_features"]), int(attrs["group_size"])
    kept = kept_per_row(k, str(attrs["sparsity"]))
    nm = parse_sparsity(str(attrs["sparsity"]))
    return QLinearLayout(
        in_features=k, out_features=int(attrs["out_features"]), group_size=gs, scheme=scheme.name,
        bits=scheme.bits, kept=kept, groups=group_count(kept, gs), asymmetric=scheme.asymmetric,
        candidates=0 if scheme.asymmetric or low is not None else len(scheme.candidates),
        has_selectors=bool(scheme.selector_bits), nm=nm,
        nm_width=field_width(index_bits(nm[1])) if nm else 0,
        outlier_width=outlier_width if attrs["outliers"] else 0, has_bias=bool(attrs["bias"]),
        affine=low is not None, grid_low=low or 0, offsets=scheme.offsets, scale_dtype=scheme.scale_dtype)


def grid_table(scheme: Scheme) -> np.ndarray:
    """int8 [candidates, 16]: value of code c under candidate grid i (unused codes 0)."""
    table = np.zeros((len(scheme.candidates), 16), dtype=np.int8)
    for i, g in enumerate(scheme.candidates):
        table[i, :len(g.values)] = g.values
    return table


def _split_operands(attrs: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> tuple[dict, list]:
    roles = [r for r, _ in operand_types(dict(attrs))]
    want = len(roles) + (3 if attrs["outliers"] else 0) + (1 if attrs["bias"] else 0)
    if len(arrays) != want:
        raise BitsmithError(f"qlinear {attrs['scheme']}: expected {want} constant operands "
                            f"({', '.join(roles)}{', outliers' if attrs['outliers'] else ''}"
                            f"{', bias' if attrs['bias'] else ''}), got {len(arrays)}")
    for (role, t), a in zip(operand_types(dict(attrs)), arrays):
        if tuple(a.shape) != tuple(t.shape) or str(a.dtype) != t.dtype:
            raise BitsmithError(f"qlinear operand {role}: {a.dtype}{list(a.shape)} != {t}")
    return dict(zip(roles, arrays)), list(arrays[len(roles):])


def _decoded_at(attrs, ops: dict, scheme: Scheme, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 decoded (pre-outlier) weight at dense positions (rows[i], cols[i]); 0 where N:M
    pruned. Decodes only the rows involved, one row at a time, never the whole matrix."""
    k, gs = int(attrs["in_features"]), int(attrs["group_size"])
    kept = kept_per_row(k, str(attrs["sparsity"]))
    nm = parse_sparsity(str(attrs["sparsity"]))
    table = np.zeros((len(scheme.candidates), 1 << scheme.bits), dtype=np.float32)
    for i, g in enumerate(scheme.candidates):
        table[i, :len(g.values)] = g.values
    out = np.zeros(len(rows), dtype=np.float32)
    for r in np.unique(rows):
        sel_i = np.flatnonzero(rows == r)
        codes = unpack_codes(ops["codes"][r:r + 1], scheme.bits, kept)[0]
        if nm is None:
            kk = cols[sel_i].astype(np.int64)
            present = np.ones(len(kk), dtype=bool)
        else:
            n, m = nm
            idx = unpack_codes(ops["nm_index"][r:r + 1], index_bits(m), kept)[0].astype(np.int64)
            dense_col = (np.arange(kept) // n) * m + idx
            where = {int(c): i for i, c in enumerate(dense_col)}
            kk = np.array([where.get(int(c), -1) for c in cols[sel_i]], dtype=np.int64)
            present = kk >= 0
            kk = np.where(present, kk, 0)
        g = kk // gs
        scale = ops["scales"][r, g].astype(np.float32)
        c = codes[kk]
        if scheme.asymmetric:
            v = (c.astype(np.float32) - ops["zeros"][r, g].astype(np.float32)) * scale
        else:
            sel = unpack_codes(ops["selectors"][r:r + 1], scheme.selector_bits, group_count(kept, gs))[0][g] \
                if scheme.selector_bits else np.zeros_like(c)
            v = table[sel, c] * scale
        if scheme.offsets:
            v = v + ops["offsets"][r, g].astype(np.float32)
        out[sel_i] = np.where(present, v, np.float32(0))
    return out


def qlinear_operands(attrs: Mapping[str, Any], arrays: Sequence[np.ndarray], act_dtype: str) -> list[np.ndarray]:
    """Kernel operands (see the module docstring and ``QLinearLayout.roles``) from a qlinear
    node's constant operands (everything after x, in IR order). Deterministic."""
    _check_attrs(attrs)
    scheme = get_scheme(str(attrs["scheme"]))
    ops, rest = _split_operands(attrs, arrays)
    n_out = int(attrs["out_features"])
    width = 0
    ell: list[np.ndarray] = []
    if attrs["outliers"]:
        vals, cols, ptr = (np.asarray(a) for a in rest[:3])
        rest = rest[3:]
        if ptr.shape != (n_out + 1,) or ptr[0] != 0 or ptr[-1] != len(vals) or (np.diff(ptr) < 0).any():
            raise BitsmithError("qlinear outlier rowptr is not a valid CSR row pointer")
        if len(cols) and (cols.min() < 0 or cols.max() >= int(attrs["in_features"])):
            raise BitsmithError("qlinear outlier column out of range")
        counts = np.diff(ptr)
        width = max(1, int(counts.max()))
        rows = np.repeat(np.arange(n_out), counts)
        corr = (vals.astype(np.float64) - _decoded_at(attrs, ops, scheme, rows, cols)).astype(np.float32)
        if not len(vals):
            cols, corr = np.zeros(1, np.int32), np.zeros(1, np.float32)
        ell = [np.ascontiguousarray(cols, dtype=np.int32), corr, np.ascontiguousarray(ptr, dtype=np.int32)]
    layout = layout_for(attrs, width)
    codes = unpack_codes(ops["codes"], scheme.bits, layout.kept)
    out = [pack_sliced((codes >> shift) & ((1 << w) - 1), w) for w, shift in layout.code_streams]
    out.append(np.ascontiguousarray(ops["scales"], dtype=layout.scale_dtype))
    if scheme.asymmetric:
        out.append(np.ascontiguousarray(ops["zeros"], dtype=np.uint8))
    elif not layout.affine:
        out.append(grid_table(scheme))
    if layout.offsets:
        out.append(np.ascontiguousarray(ops["offsets"], dtype=layout.scale_dtype))
    if scheme.selector_bits:
        out.append(unpack_codes(ops["selectors"], scheme.selector_bits, layout.groups))
    if layout.nm is not None:
        idx = unpack_codes(ops["nm_index"], index_bits(layout.nm[1]), layout.kept)
        out.append(pack_sliced(idx, layout.nm_width))
    out += ell
    if attrs["bias"]:
        bias = np.asarray(rest[0])
        if bias.shape != (n_out,):
            raise BitsmithError(f"qlinear bias has shape {bias.shape}, expected ({n_out},)")
        out.append(bias.astype(act_dtype))
    return out


def operand_specs(attrs: Mapping[str, Any], arrays: Sequence[np.ndarray], act_dtype: str,
                  ) -> list[tuple[tuple[int, ...], str]]:
    """(shape, numpy dtype name) of each array ``qlinear_operands`` returns, from the operands'
    shapes and the attributes alone (no codes are unpacked): loading checks stored operands
    against it, so a stored operand of the wrong shape is refused before a kernel sees it."""
    scheme = get_scheme(str(attrs["scheme"]))
    ops, rest = _split_operands(attrs, arrays)
    n_out = int(attrs["out_features"])
    layout = layout_for(attrs, 1)
    rows = tuple(ops["codes"].shape[:-1])
    out = [(rows + (sliced_length(layout.kept, w),), "uint8") for w, _ in layout.code_streams]
    out.append((tuple(ops["scales"].shape), layout.scale_dtype))
    if scheme.asymmetric:
        out.append((tuple(ops["zeros"].shape), "uint8"))
    elif not layout.affine:
        out.append(((len(scheme.candidates), 16), "int8"))
    if layout.offsets:
        out.append((tuple(ops["offsets"].shape), layout.scale_dtype))
    if scheme.selector_bits:
        out.append((tuple(ops["selectors"].shape[:-1]) + (layout.groups,), "uint8"))
    if layout.nm is not None:
        out.append((tuple(ops["nm_index"].shape[:-1]) + (sliced_length(layout.kept, layout.nm_width),), "uint8"))
    if attrs["outliers"]:
        nnz = max(1, int(np.asarray(rest[0]).shape[0]))
        out += [((nnz,), "int32"), ((nnz,), "float32"), ((n_out + 1,), "int32")]
        rest = rest[3:]
    if attrs["bias"]:
        out.append(((n_out,), np.dtype(act_dtype).name))
    return out
