"""Per-group weight quantization: fitting a group's scale (and zero point or grid selector),
rounding weights to the nearest grid value, and decoding codes back to floats.

A group is a block of consecutive weights of one row; ``fit_groups`` handles the same
column-block for every row at once ([N, g] in, one set of parameters per row out).

* Symmetric grids (int-sym, FP3, FP4, BitMoD types): ``scale = absmax / max|grid|`` stored in
  fp16, as BitMoD does (Chen et al., HPCA 2025, Sec. IV); a one-sided grid (EA+, EA-) then
  clips the extreme of the other side.
* Asymmetric INT-k: min-max, ``scale = (max - min) / (2^k - 1)``, ``zero = round(-min / scale)``
  clipped to the code range; a weight decodes as ``(code - zero) * scale``.
* Several candidate grids (``bitmod-w3``/``bitmod-w4``: ER+, ER-, EA+, EA-): each row keeps
  the candidate whose round-to-nearest reconstruction, computed with the scale as stored
  (fp16), has the least squared error; exact ties go to the first candidate.

Rounding: a weight goes to the grid value nearest to it *after* scaling (``grid[c] * scale``,
which is exact in float32 for an fp16 scale); an exact tie between two grid values goes to the
smaller value. The comparison is done as ``w / scale`` in float64 against the midpoints of the
integer grid, which decides the same as comparing the float32 distances exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.ir.quant_grids import Grid, Scheme


from bitsmith.ir.code_packing import group_count, group_index

FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class GroupParams:
    """Parameters of one group column-block, one entry per row."""

    scale: np.ndarray  # float16 [N]
    zero: np.ndarray | None = None  # uint8 [N], asymmetric schemes
    selector: np.ndarray | None = None  # uint8 [N], schemes with several candidate grids


@dataclass(frozen=True)
class QuantizedMatrix:
    """A whole [N, K] weight matrix quantized group by group (codes not yet bit-packed)."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float16 [N, G]
    zeros: np.ndarray | None = None  # uint8 [N, G]
    selectors: np.ndarray | None = None  # uint8 [N, G]


# ---------------------------------------------------------------- rounding to one grid

def _round_codes(t: np.ndarray, grid: Grid) -> np.ndarray:
    """Codes of the grid values nearest to ``t`` (float64, in grid units); ties to the smaller."""
    values = np.asarray(grid.values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    position = np.zeros(t.shape, dtype=np.uint8)  # index into the ascending values
    for mid in (ordered[1:] + ordered[:-1]) / 2:
        position += t > mid  # strict: t equal to a midpoint stays on the lower neighbour
    return order.astype(np.uint8)[position]


def _grid_units(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """``w / scale (+ zero)`` in float64, per row; a zero scale maps every weight to 0 (+ zero)."""
    s = scale.astype(np.float64)[:, None]
    t = np.divide(w.astype(np.float64), s, out=np.zeros(w.shape, np.float64), where=s != 0)
    if zero is not None:
        t += zero.astype(np.float64)[:, None]
    return t


def _grid_table(scheme: Scheme) -> np.ndarray:
    """float32 [candidates, 2**bits]: the value of each code in each candidate grid."""
    table = np.zeros((len(scheme.candidates), 1 << scheme.bits), dtype=np.float32)
    for i, g in enumerate(scheme.candidates):
        table[i, :len(g.values)] = g.values
    return table


def _to_fp16_scale(scale: np.ndarray) -> np.ndarray:
    return np.minimum(scale, FP16_MAX).astype(np.float16)


# ---------------------------------------------------------------- fitting

def _participating(w: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.ones(w.shape, dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {mask.shape} != weight shape {w.shape}")
    return mask


def _fit_asymmetric(w: np.ndarray, mask: np.ndarray, scheme: Scheme) -> GroupParams:
    levels = len(scheme.candidates[0].values)
    w64 = w.astype(np.float64)
    any_in = mask.any(axis=1)
    lo = np.where(any_in, np.where(mask, w64, np.inf).min(axis=1), 0.0)
    hi = np.where(any_in, np.where(mask, w64, -np.inf).max(axis=1), 0.0)
    scale = _to_fp16_scale((hi - lo) / (levels - 1))
    # A constant group (max == min) or one whose range underflows fp16: scale by the constant
    # itself, so code 1 (or code 0 with zero 1) decodes to it; an all-zero group uses scale 1.
    degenerate = scale == 0
    if degenerate.any():
        mag = _to_fp16_scale(np.maximum(np.abs(lo), np.abs(hi)))
        scale = np.where(degenerate, np.where(mag == 0, np.float16(1), mag), scale)
    s = scale.astype(np.float64)
    zero = np.clip(np.round(-lo / s), 0, levels - 1).astype(np.uint8)
    return GroupParams(scale=scale, zero=zero)


def _fit_symmetric(w: np.ndarray, mask: np.ndarray, scheme: Scheme) -> tuple[GroupParams, np.ndarray]:
    """Each candidate's fp16 scale and RTN codes; per row, the candidate with least error."""
    absmax = np.where(mask, np.abs(w.astype(np.float64)), 0.0).max(axis=1, initial=0.0)
    w64 = w.astype(np.float64)
    best: tuple[np.ndarray, np.ndarray] | None = None
    best_err = selector = None
    for i, grid in enumerate(scheme.candidates):
        scale = _to_fp16_scale(absmax / grid.max_abs)
        codes = _round_codes(_grid_units(w, scale, None), grid)
        if len(scheme.candidates) == 1:
            return GroupParams(scale=scale), codes
        decoded = grid.array()[codes] * scale.astype(np.float32)[:, None]
        err = (np.square(w64 - decoded.astype(np.float64)) * mask).sum(axis=1)
        if best is None:
            best, best_err, selector = (scale, codes), err, np.zeros(w.shape[0], np.uint8)
            continue
        better = err < best_err  # strict: ties keep the earlier candidate
        best = (np.where(better, scale, best[0]), np.where(better[:, None], codes, best[1]))
        best_err = np.where(better, err, best_err)
        selector = np.where(better, np.uint8(i), selector)
    return GroupParams(scale=best[0], selector=selector), best[1]


def _fit(w: np.ndarray, scheme: Scheme, mask: np.ndarray | None) -> tuple[GroupParams, np.ndarray]:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"fit_groups takes a [rows, group] block, got shape {w.shape}")
    mask = _participating(w, mask)
    if scheme.asymmetric:
        params = _fit_asymmetric(w, mask, scheme)
        return params, quantize_to_params(w, params, scheme)
    return _fit_symmetric(w, mask, scheme)


def fit_groups(w: np.ndarray, scheme: Scheme, mask: np.ndarray | None = None) -> GroupParams:
    """Fits the parameters of one group column-block ``w`` (float [N, g]) for every row.

    ``mask`` (bool [N, g], True = the weight participates) leaves weights out of the fit,
    e.g. outliers kept in fp16 elsewhere. See the module docstring for the rules.
    """
    return _fit(w, scheme, mask)[0]


# ---------------------------------------------------------------- rounding and decoding

def quantize_to_params(w: np.ndarray, params: GroupParams, scheme: Scheme) -> np.ndarray:
    """uint8 codes [N, g'] of ``w`` rounded to the nearest value of each row's scaled grid
    (ties to the smaller value); weights outside the grid's range go to its nearest end."""
    w = np.asarray(w, dtype=np.float32)
    t = _grid_units(w, params.scale, params.zero)
    if params.selector is None:
        return _round_codes(t, scheme.candidates[0])
    codes = np.zeros(w.shape, dtype=np.uint8)
    for i, grid in enumerate(scheme.candidates):
        rows = params.selector == i
        if rows.any():
            codes[rows] = _round_codes(t[rows], grid)
    return codes


def decode(codes: np.ndarray, params: GroupParams, scheme: Scheme) -> np.ndarray:
    """float32 [N, g']: the weights the codes stand for, as bitsmith.ir.quantized decodes them."""
    codes = np.asarray(codes)
    scale = params.scale.astype(np.float32)[:, None]
    if scheme.asymmetric:
        return (codes.astype(np.float32) - params.zero.astype(np.float32)[:, None]) * scale
    table = _grid_table(scheme)
    sel = np.zeros(codes.shape[0], dtype=np.intp) if params.selector is None else params.selector
    return table[np.asarray(sel, dtype=np.intp)[:, None], codes] * scale


# ---------------------------------------------------------------- whole matrices

def _stack_params(parts: list[GroupParams], rows: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per-part [rows * groups] parameter vectors -> [rows, total groups] arrays."""
    def join(field: str) -> np.ndarray | None:
        arrays = [getattr(p, field) for p in parts]
        if arrays[0] is None:
            return None
        return np.concatenate([a.reshape(rows, -1) for a in arrays], axis=1)
    return join("scale"), join("zero"), join("selector")


def quantize_matrix(w: np.ndarray, scheme: Scheme, group_size: int,
                    mask: np.ndarray | None = None) -> QuantizedMatrix:
    """Round-to-nearest quantization of ``w`` [N, K] in groups of ``group_size`` along each row
    (the last group may be shorter); ``mask`` as in :func:`fit_groups`."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_matrix takes a [out, in] matrix, got shape {w.shape}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    n, k = w.shape
    mask = _participating(w, mask)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(k, 1))
    if n > rows:  # rows are independent: bounded float64 temporaries (a 7B MLP weight is 45M weights)
        chunks = [_quantize_rows(w[i:i + rows], scheme, group_size, mask[i:i + rows]) for i in range(0, n, rows)]
        return QuantizedMatrix(*(None if getattr(chunks[0], f) is None else
                                 np.concatenate([getattr(c, f) for c in chunks]) for f in _FIELDS))
    return _quantize_rows(w, scheme, group_size, mask)


ROW_CHUNK_ELEMENTS = 1 << 21  # weights quantized together: float64 temporaries of 16 MiB each
_FIELDS = ("codes", "scales", "zeros", "selectors")


def _quantize_rows(w: np.ndarray, scheme: Scheme, group_size: int, mask: np.ndarray) -> QuantizedMatrix:
    n, k = w.shape
    full = k // group_size
    parts, codes = [], []
    if full:  # all full groups in one call: rows of [N * full, group_size]
        head = slice(0, full * group_size)
        p, c = _fit(w[:, head].reshape(n * full, group_size), scheme,
                              mask[:, head].reshape(n * full, group_size))
        parts.append(p)
        codes.append(c.reshape(n, full * group_size))
    if k > full * group_size:
        p, c = _fit(w[:, full * group_size:], scheme, mask[:, full * group_size:])
        parts.append(p)
        codes.append(c)
    scales, zeros, selectors = _stack_params(parts, n)
    return QuantizedMatrix(np.concatenate(codes, axis=1), scales, zeros, selectors)


def group_params(qm: QuantizedMatrix, group: int) -> GroupParams:
    """The parameters of column-block ``group`` of a quantized matrix."""
    return GroupParams(qm.scales[:, group],
                       None if qm.zeros is None else qm.zeros[:, group],
                       None if qm.selectors is None else qm.selectors[:, group])


def dequantize_matrix(qm: QuantizedMatrix, scheme: Scheme, group_size: int) -> np.ndarray:
    """float32 [N, K]: the dense weight a QuantizedMatrix stands for."""
    n, k = qm.codes.shape
    if qm.scales.shape != (n, group_count(k, group_size)):
        raise ValueError(f"scales {qm.scales.shape} do not match {k} columns in groups of {group_size}")
    gi = group_index(k, group_size)
    expanded = GroupParams(qm.scales[:, gi].reshape(-1),
                           None if qm.zeros is None else qm.zeros[:, gi].reshape(-1),
                           None if qm.selectors is None else qm.selectors[:, gi].reshape(-1))
    return decode(qm.codes.reshape(-1, 1), expanded, scheme).reshape(n, k)


def select_outliers(w: np.ndarray, scheme: Scheme, group_size: int, fraction: float,
                    importance: np.ndarray | None = None) -> np.ndarray:
    """bool [N, K], True for the ``ceil(fraction * N * K)`` weights with the largest
    quantization-error impact ``(w - RTN(w))^2 * importance[k]`` (SpQR, Dettmers et al. 2023,
    keeps such weights in higher precision). ``importance`` is a per-input-column weight such as
    the Hessian diagonal (None: ones). Ties go to the earlier weight in row-major order."""
    w = np.asarray(w, dtype=np.float32)
    if not 0 <= fraction < 1:
        raise ValueError(f"outlier fraction must be in [0, 1), got {fraction}")
    count = int(np.ceil(fraction * w.size - 1e-9))
    mask = np.zeros(w.shape, dtype=bool)
    if count == 0:
        return mask
    rtn = dequantize_matrix(quantize_matrix(w, scheme, group_size), scheme, group_size)
    impact = np.square(w.astype(np.float64) - rtn)
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64)
        if importance.shape != (w.shape[1],):
            raise ValueError(f"importance must have shape ({w.shape[1]},), got {importance.shape}")
        impact = impact * importance[None, :]
    flat = impact.reshape(-1)
    threshold = np.partition(flat, flat.size - count)[flat.size - count]  # the count-th largest
    above = flat > threshold
    ties = np.flatnonzero(flat == threshold)[:count - int(above.sum())]  # earliest ties first
    mask.reshape(-1)[above] = True
    mask.reshape(-1)[ties] = True
    return mask
