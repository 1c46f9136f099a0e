"""Binary-coding quantization (BCQ) with power-of-two scales: ShiftAddLLM's weight format.

You, Guo, ... Lin, "ShiftAddLLM: Accelerating Pretrained LLMs via Post-Training
Multiplication-Less Reparameterization", NeurIPS 2024. Each output row ``n`` of ``W`` [N, K] is
cut into groups of ``group_size`` columns, and every group is written as

    W[n, group g] ≈ Σ_{i < bits} α[i, n, g] · B[i, n, group g],      B ∈ {-1, +1}

With ``α`` a power of two (``scale="pow2"``) every multiplication by ``α`` is a shift and
``B·x`` is a sum of ± activations, so the layer runs without multiplications; ``"apot2"``
allows a sum of two powers of two (two shifts and an add); ``"fp16"`` keeps plain BCQ scales
for ablation.

Fitting without calibration (Xu et al., "Alternating Multi-bit Quantization", ICLR 2018, the
fit ShiftAddLLM builds on): greedy initialisation (plane ``i`` takes the sign of the residual
and its mean magnitude per group), then alternating refinement: least-squares ``α`` given
``B``, then for every weight the best of the ``2^bits`` sign patterns given ``α``. Each group
keeps the best state it has seen, so refinement never increases the error of the
initialisation (groups are independent: the error is a sum over groups).

Power-of-two scales change what works. Greedy with each ``α`` rounded is poor (it doubles the
error of the best pow2 grid on SmolLM2 layers), and least squares followed by rounding stalls:
the nearest powers of two of the least-squares scales of a uniform grid are that grid again.
So pow2/apot2 start from the best of greedy, the best uniform grid ``±h·(1, 3, ..., 2^bits-1)``
with ``h`` a power of two (searched over 40 octaves, so groups with an outlier may clip it:
never worse than round-to-nearest with a power-of-two scale), and a small dictionary of
non-uniform pow2 shapes; refinement snaps least-squares scales by a joint search over each
plane's neighbouring representable values (exact error from the planes' Gram matrix).

With a calibration Hessian ``H ∝ XᵀX`` (ShiftAddLLM §3.2, "multi-objective optimization"):
GPTQ's column loop (Frantar et al., ICLR 2023; see gptq.py), each group's scales fitted to its
weights after compensation for the earlier columns (weight objective), each column's signs the
nearest level of its group, the column's error pushed onto the columns not yet quantized
(output objective). Then ``refits`` rounds of: the scales of each row that minimise the output
error ``(w - q) H (w - q)ᵀ`` given the signs (``q`` is linear in the row's ``bits·G`` scales),
and the column loop again with those scales fixed; each row keeps its best state. ShiftAddLLM's
code instead gives every column its own scales per group of output rows; the issue's format
(groups along K per output row) is kept here.

Zero level. A ±1 code with ``bits`` planes has no level 0 unless a signed sum of its scales
vanishes, and the grids that minimise the weight error (the uniform ``±h·(1, 3, ..., 7)`` above
all) never have one: every near-zero weight becomes ``±h``. On SmolLM2-135M that, not the size
of the error, breaks the model: quantizing only the attention projections with the symmetric
pow2-step grid (relative weight MSE 0.072) gives perplexity 948, the same grid shifted to hold 0
(levels ``h·(-4..3)``, MSE 0.071) 44.6 (fp32 21.8; 4 windows of 256 tokens). ``zero_level=True``
keeps only states with a level 0, but a pow2 code pays for it in levels (3 bits: scales
``(2c, c, c)``, levels 0, ±2c, ±4c; 2 bits: ``(c, c)``) and measured worse on the whole model
(3 bits: perplexity 939005 vs 150937), so it is off by default; apot2 3 bits can hold
``(3c, 2c, c)``, the 7-level symmetric grid with a 0.

Offset (``offset=True``). A per-group offset ``z = c · α_last`` (``c`` an int8, ``α_last`` the
group's smallest scale) gives the ±1 code a zero point without losing levels: with scales
``(2^(bits-1) h, ..., 2h, h)`` and ``c`` odd the levels are ``2h·(j - j0)``, ``j`` in
``0..2^bits-1``, ``j0 = (2^bits - 1 - c) / 2``: round-to-nearest with a zero point, its step a
power of two (apot2: also 1.125, 1.25, 1.5 times one). This is the extended BCQ of LUT-GEMM
(Park et al., ICLR 2024, "BCQ with an offset" represents uniform quantization), with the offset
tied to the last scale so it stays a shift times a small integer. The fit searches the step per
group from covering the group's range down to ``OFFSET_CLIP_OCTAVES`` below it (clipping when
that lowers the error, weighted by the Hessian diagonal when calibrating) and every zero point,
then refines like the plain fit keeping only states with a level 0; with a Hessian the column
loop's levels include the offset and the scale refits treat the last plane as ``s + c``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SCALES = ("pow2", "apot2", "fp16")
EXPONENT_NONE = -128  # the exponent sentinel of a zero term
_EXP_MIN, _EXP_MAX = -126, 127  # float32 normal range: 2.0**e is exact in float32
_APOT2_SPAN = 20  # apot2: the second term at most this many octaves below the first


class BCQFitError(ValueError):
    """The BCQ fit was asked for something it cannot do."""


@dataclass(frozen=True)
class BCQFit:
    """A fitted BCQ weight. ``alphas`` are the exact values used (``2.0**exponents`` for pow2,
    the sum of the two terms for apot2)."""

    signs: np.ndarray  # int8 ±1 [bits, N, K]
    alphas: np.ndarray  # float32 >= 0 [bits, N, G]
    exponents: np.ndarray | None  # pow2: int8 [bits, N, G]; apot2: int8 [bits, N, G, 2]; fp16: None
    group_size: int
    scale: str
    offset_units: np.ndarray | None = None  # int8 [N, G]: offset = units · alphas[-1] (``offset=True``)

    @property
    def bits(self) -> int:
        return int(self.signs.shape[0])

    def reconstruct(self) -> np.ndarray:
        """float32 [N, K]: ``Σ_i α[i]`` (broadcast over its group) ``· B[i]``."""
        k = self.signs.shape[2]
        per_column = np.repeat(self.alphas, self.group_size, axis=2)[:, :, :k]
        planes = np.sum(per_column * self.signs.astype(np.float32), axis=0, dtype=np.float32)
        if self.offset_units is None:
            return planes
        z = self.offset_units.astype(np.float32) * self.alphas[-1]  # exact: |c| < 2^7, α a (sum of) power(s) of two
        return planes + np.repeat(z, self.group_size, axis=1)[:, :k]


# ----------------------------------------------------------------------------- scale grids

def _pow2_exponent(a: np.ndarray) -> np.ndarray:
    """floor(log2 a) for a > 0, clipped to the float32 normal range."""
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.maximum(a, np.finfo(np.float64).tiny)))
    return np.clip(e, _EXP_MIN, _EXP_MAX)


def _pow2_neighbours(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The representable pow2 values just below and just above ``a`` (0 counts as representable)."""
    a = np.maximum(a, 0.0)
    e = _pow2_exponent(a)
    low = np.exp2(e)
    low = np.where(low > a, 0.0, low)  # a below the smallest power: 0 is the value below
    high = np.where(low == a, low, np.exp2(np.minimum(e + (low > 0), _EXP_MAX)))
    return low, np.maximum(high, low)


def _apot2_neighbours(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The representable ``2^e0 + 2^e1`` (either term may be absent) values just below and
    just above ``a``: with ``e0 = floor(log2 a)``, the second term is the pow2 neighbours of
    the remainder ``a - 2^e0``, and ``2^(e0+1)`` bounds the set from above."""
    a = np.maximum(a, 0.0)
    p_low, p_high = _pow2_neighbours(a)
    r_low, r_high = _pow2_neighbours(a - p_low)
    finest = p_low * 2.0 ** -_APOT2_SPAN  # a finer second term would not be exact in float32
    r_low = np.where(r_low < finest, 0.0, r_low)
    r_high = np.maximum(r_high, finest)
    low = p_low + r_low
    high = np.minimum(p_low + r_high, np.where(p_low == 0, p_high, 2 * p_low))
    return low, np.maximum(high, low)


def _neighbours(a: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    return _pow2_neighbours(a) if scale == "pow2" else _apot2_neighbours(a)


def _nearest(a: np.ndarray, scale: str) -> np.ndarray:
    low, high = _neighbours(a, scale)
    return np.where(a - low <= high - a, low, high)


def _exponents_of(alphas: np.ndarray, scale: str) -> np.ndarray | None:
    """The int8 exponents of exactly representable alphas."""
    if scale == "fp16":
        return None
    a = alphas.astype(np.float64)
    if scale == "pow2":
        e = np.where(a > 0, _pow2_exponent(a), EXPONENT_NONE)
        return e.astype(np.int8)
    e0 = np.where(a > 0, _pow2_exponent(a), EXPONENT_NONE)
    rest = a - np.where(a > 0, np.exp2(np.maximum(e0, _EXP_MIN)), 0.0)
    e1 = np.where(rest > 0, _pow2_exponent(rest), EXPONENT_NONE)
    return np.stack([e0, e1], axis=-1).astype(np.int8)


# ----------------------------------------------------------------------------- group algebra

def _sign_patterns(bits: int) -> np.ndarray:
    """[2^bits, bits] every ±1 pattern."""
    p = np.arange(2 ** bits)
    return (((p[:, None] >> np.arange(bits)) & 1) * 2 - 1).astype(np.float64)


def _best_signs(w: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """For every weight of ``w`` [R, G, L] the ±1 pattern [bits, R, G, L] whose value
    ``Σ_i α_i s_i`` (``alphas`` [bits, R, G]) is nearest: exhaustive over 2^bits patterns."""
    bits = alphas.shape[0]
    patterns = _sign_patterns(bits)  # [P, bits]
    values = np.einsum("pb,brg->rgp", patterns, alphas)  # [R, G, P]
    best = np.empty(w.shape, dtype=np.int64)
    rows_per_chunk = max(1, (1 << 22) // max(1, w.shape[1] * w.shape[2] * len(patterns)))
    for r0 in range(0, w.shape[0], rows_per_chunk):
        r1 = r0 + rows_per_chunk
        dist = np.abs(w[r0:r1, :, :, None] - values[r0:r1, :, None, :])
        best[r0:r1] = np.argmin(dist, axis=-1)
    return np.moveaxis(patterns[best], -1, 0)  # [bits, R, G, L]


def _gram(signs: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group: ``BᵀB`` [R, G, bits, bits] and ``Bᵀw`` [R, G, bits] (padding is 0 in ``signs``)."""
    s = np.moveaxis(signs, 0, 2)  # [R, G, bits, L]: batched matrix products, far faster than einsum
    return s @ np.swapaxes(s, -1, -2), (s @ w[..., None])[..., 0]


def _group_error(alphas: np.ndarray, gram: np.ndarray, rhs: np.ndarray, ww: np.ndarray) -> np.ndarray:
    """``‖w - Bα‖²`` per group from ``αᵀGα - 2αᵀBᵀw + wᵀw``; ``alphas`` [..., R, G, bits]."""
    quad = np.einsum("...rgi,rgij,...rgj->...rg", alphas, gram, alphas)
    return quad - 2 * np.einsum("...rgi,rgi->...rg", alphas, rhs) + ww


def _least_squares_alphas(signs: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``α = argmin ‖w - Bα‖`` per group (pseudo-inverse: planes may coincide in small groups).
    Negative ``α`` flip their plane, so all returned ``α >= 0``. Returns (alphas [bits, R, G], signs)."""
    gram, rhs = _gram(signs, w)
    alphas = np.einsum("rgij,rgj->irg", np.linalg.pinv(gram), rhs)
    flip = np.where(alphas < 0, -1.0, 1.0)
    return alphas * flip, signs * flip[..., None]


def _snap_alphas(alphas: np.ndarray, signs: np.ndarray, w: np.ndarray, scale: str,
                 sweeps: int = 2) -> np.ndarray:
    """Representable ``α`` near the least-squares ones with the lowest group error given ``B``:
    every combination of each plane's neighbour below/above (2^bits, exact error from the Gram
    matrix), then coordinate descent (each plane's optimum given the others, snapped to its
    nearer neighbour: the error is a convex quadratic in one ``α``)."""
    bits = alphas.shape[0]
    gram, rhs = _gram(signs, w)
    ww = np.einsum("rgl,rgl->rg", w, w)
    low, high = _neighbours(alphas, scale)
    choice = _sign_patterns(bits) > 0  # [P, bits]: True -> above
    candidates = np.where(choice[:, :, None, None], high[None], low[None])  # [P, bits, R, G]
    cand = np.moveaxis(candidates, 1, -1)  # [P, R, G, bits]
    err = _group_error(cand, gram, rhs, ww)  # [P, R, G]
    best = np.take_along_axis(cand, np.argmin(err, axis=0)[None, :, :, None], axis=0)[0]  # [R, G, bits]
    for _ in range(sweeps):
        for i in range(bits):
            others = rhs[..., i] - np.einsum("rgj,rgj->rg", gram[..., i, :], best) + gram[..., i, i] * best[..., i]
            diag = gram[..., i, i]
            opt = np.where(diag > 0, others / np.where(diag > 0, diag, 1.0), 0.0)
            best[..., i] = _nearest(np.maximum(opt, 0.0), scale)
    return np.moveaxis(best, -1, 0)


def _errors(w: np.ndarray, alphas: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """‖w - Σ α_i B_i‖² per group [R, G]."""
    return np.sum((w - np.einsum("irg,irgl->rgl", alphas, signs)) ** 2, axis=-1)


def _greedy(w: np.ndarray, mask: np.ndarray, bits: int, scale: str) -> tuple[np.ndarray, np.ndarray]:
    """Greedy BCQ: plane ``i`` = sign of the residual, ``α_i`` = its mean magnitude over the
    group (snapped to the nearest representable value for pow2/apot2)."""
    counts = np.maximum(mask.sum(axis=-1), 1)
    residual = w.copy()
    alphas = np.zeros((bits,) + w.shape[:2])
    signs = np.zeros((bits,) + w.shape)
    for i in range(bits):
        s = np.where(residual >= 0, 1.0, -1.0) * mask
        a = np.sum(np.abs(residual) * mask, axis=-1) / counts
        if scale != "fp16":
            a = _nearest(a, scale)
        alphas[i], signs[i] = a, s
        residual = residual - a[..., None] * s
    return alphas, signs


def _coverage(bits: int) -> float:
    """pow2/apot2 fits keep ``Σ_i α_i >= _coverage(bits) · max|w|`` in every group: the
    largest weight is clipped by at most half a step of the uniform grid (``1 - 2^-bits`` of the
    top level), as round-to-nearest would. Minimising the squared error alone clips outliers
    (SmolLM2's layers.27.mlp.gate_proj: 9.25 -> 3.5), and those few weights carry the model:
    perplexity 273042 with clipping vs 77.9 for round-to-nearest int3 (4 windows of 256 tokens);
    full coverage (factor 1) triples the weight error of pow2 3-bit fits instead."""
    return COVERAGE if COVERAGE is not None else 1.0 - 2.0 ** -bits


COVERAGE: float | None = None  # research override of _coverage (benchmarks/shiftadd_quality_numpy.py)


def _covers(top: np.ndarray, peak: np.ndarray, bits: int) -> np.ndarray:
    return top >= _coverage(bits) * peak * (1 - 1e-12)


UNIFORM_SPAN = 40  # octaves below the group's peak searched for the uniform grid's step


def _uniform_pow2_grid(w: np.ndarray, mask: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The best symmetric uniform grid ``±h·(1, 3, ..., 2^bits - 1)`` with ``h`` a power of two,
    per group, as BCQ: alphas ``(2^(bits-1) h, ..., 2h, h)`` and the binary digits of each
    weight's level as signs, among the grids whose top level covers the group's peak. It is
    what round-to-nearest with a power-of-two scale gives, and a pow2 BCQ can always reach
    it, so the fit starts no worse (outlier groups included)."""
    levels = 2 ** bits
    peak = np.max(np.abs(w), axis=-1)
    top = np.ceil(np.log2(np.maximum(peak, np.finfo(np.float64).tiny))) + 1
    best_err = np.full(peak.shape, np.inf)
    best_h = np.zeros(peak.shape)
    for d in range(bits, bits + UNIFORM_SPAN + 1):
        h = np.exp2(np.clip(top - d, _EXP_MIN, _EXP_MAX - bits))[..., None]
        m = np.clip(np.rint((w / h + levels - 1) / 2), 0, levels - 1)
        err = np.sum(((w - h * (2 * m - levels + 1)) * mask) ** 2, axis=-1)
        err = np.where(_covers(h[..., 0] * (levels - 1), peak, bits), err, np.inf)
        better = err < best_err
        best_err, best_h = np.where(better, err, best_err), np.where(better, h[..., 0], best_h)
    best_h = np.where(peak > 0, best_h, 0.0)
    h = best_h[..., None]
    m = np.clip(np.rint((w / np.where(h > 0, h, 1.0) + levels - 1) / 2), 0, levels - 1).astype(np.int64)
    alphas = np.stack([best_h * 2.0 ** (bits - 1 - i) for i in range(bits)])
    signs = np.stack([((m >> (bits - 1 - i)) & 1) * 2.0 - 1 for i in range(bits)]) * mask
    return alphas, signs


_DROPS = (0, 1, 2)  # 0 (equal scales) gives a zero level: bulk weights of a group with an outlier


def _shape_drops(bits: int) -> list[tuple[int, ...]]:
    """Exponent drops between consecutive planes searched by :func:`_pow2_dictionary`
    (``alphas ∝ 2^0, 2^-d1, 2^-d1-d2, ...``; all drops 1 is the uniform grid)."""
    return list(itertools.product(_DROPS, repeat=bits - 1))


def _apot2_shapes(bits: int) -> list[np.ndarray]:
    """apot2 can hold the symmetric uniform grid with a level 0: ``(2^(bits-1) - 1, ..., 2, 1)·c``
    is not pow2 but for 3 bits every term is a sum of two powers of two (3 = 2 + 1), giving
    levels 0, ±2c, ..., ±(2^bits - 2)c."""
    if bits != 3:
        return []
    return [np.array([1.5, 1.0, 0.5])]  # times a power of two: 1.5 = 1 + 1/2


def _pow2_dictionary(w: np.ndarray, mask: np.ndarray, bits: int,
                     zero_level: bool = False, extra: list[np.ndarray] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The best pow2 BCQ grid per group among a dictionary: every shape of
    :func:`_shape_drops`, each at the three powers of two that put its top level between a
    half and twice the group's peak, every weight at its nearest level (exact error, unlike
    a least-squares step followed by rounding, which stalls at the uniform grid: the nearest
    powers of two of the least-squares scales are the grid it started from). ``zero_level``:
    only the shapes with a level 0."""
    peak = np.max(np.abs(w), axis=-1)
    best_err = np.full(peak.shape, np.inf)
    best = np.zeros((bits,) + peak.shape)
    patterns = _sign_patterns(bits)
    shapes = [np.exp2(-np.concatenate([[0], np.cumsum(d)])) for d in _shape_drops(bits)] + list(extra)
    for shape in shapes:
        if zero_level and not np.any(patterns @ shape == 0):
            continue
        levels = np.unique(patterns @ shape)
        mids = (levels[1:] + levels[:-1]) / 2
        base = np.floor(np.log2(np.maximum(peak, np.finfo(np.float64).tiny) / shape.sum()))
        for offset in (-1, 0, 1):
            c = np.exp2(np.clip(base + offset, _EXP_MIN + 1, _EXP_MAX - 3))[..., None]
            x = w / c
            q = levels[np.searchsorted(mids, x)]
            err = np.sum(((x - q) * mask) ** 2, axis=-1) * c[..., 0] ** 2
            err = np.where(_covers(c[..., 0] * shape.sum(), peak, bits), err, np.inf)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, c[..., 0] * shape[:, None, None], best)
    best = np.where(peak > 0, best, 0.0)
    return best, _best_signs(w, best) * mask


def _has_zero_level(alphas: np.ndarray, offsets: np.ndarray | None = None) -> np.ndarray:
    """Per group (``alphas`` [bits, ...], ``offsets`` [...]): whether some ±1 pattern plus the
    group's offset is exactly 0."""
    values = np.einsum("pb,b...->p...", _sign_patterns(alphas.shape[0]), alphas)
    if offsets is not None:
        values = values + offsets
    return np.any(values == 0, axis=0)


def _wants_zero_level(bits: int, scale: str, zero_level: bool) -> bool:
    return zero_level and scale != "fp16" and bits >= 2


# ----------------------------------------------------------------------------- offset grids

OFFSET_UNIT_MAX = 127  # offsets are int8 multiples of the group's last (smallest) scale
_OFFSET_MANTISSAS = {"pow2": (1.0,), "apot2": (1.0, 1.125, 1.25, 1.5)}  # h = mantissa · 2^e
OFFSET_CLIP_OCTAVES = 3  # offset grids: steps searched down to this many octaves below covering the range


def _offset_values(alphas: np.ndarray, units: np.ndarray) -> np.ndarray:
    """The offset ``z = c · α_last`` of every group (``units`` c [...], ``alphas`` [bits, ...])."""
    return units * alphas[-1]


def _offset_grid(w: np.ndarray, mask: np.ndarray, bits: int, scale: str,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group the best uniform grid with a level 0: scales ``(2^(bits-1) h, ..., 2h, h)``
    (``h`` a power of two; apot2 also ``1.125, 1.25, 1.5`` times one) and offset ``c·h`` with
    ``c`` odd, so the levels are ``2h·(j - j0)``, ``j`` in ``0..2^bits-1``, ``j0 = (2^bits - 1 -
    c) / 2``: round-to-nearest with a zero point and a power-of-two step. The step is searched
    from one octave above covering the group's range down to ``OFFSET_CLIP_OCTAVES`` below
    (clipping the extremes where that lowers the error), by the squared error weighted per
    column by ``weights`` (the Hessian diagonal when calibrating). Returns (alphas [bits, R, G],
    signs [bits, R, G, L], units c [R, G])."""
    levels = 2 ** bits
    wt = mask * (1.0 if weights is None else weights)
    lo = np.minimum(np.min(np.where(mask, w, 0.0), axis=-1), 0.0)  # the grid holds 0: its range does too
    hi = np.maximum(np.max(np.where(mask, w, 0.0), axis=-1), 0.0)
    span = np.maximum(hi - lo, np.finfo(np.float64).tiny)
    top = np.ceil(np.log2(span / (2 * (levels - 1)))) + 1  # h = 2^top covers the range twice over
    best_err = np.full(span.shape, np.inf)
    best_h, best_c = np.zeros(span.shape), np.zeros(span.shape)
    for d in range(OFFSET_CLIP_OCTAVES + 2):
        base = np.exp2(np.clip(top - d, _EXP_MIN + 2, _EXP_MAX - bits - 2))
        for mant in _OFFSET_MANTISSAS[scale]:
            h = (mant * base)[..., None]
            for j0 in range(levels):
                q = 2 * h * np.clip(np.rint(w / (2 * h)), -j0, levels - 1 - j0)
                err = np.sum(wt * (w - q) ** 2, axis=-1)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_h, best_c = np.where(better, h[..., 0], best_h), np.where(better, levels - 1 - 2 * j0, best_c)
    best_h = np.where(hi > lo, best_h, 0.0)
    h = np.where(best_h > 0, best_h, 1.0)[..., None]
    j0 = ((levels - 1 - best_c) // 2)[..., None]
    index = (np.clip(np.rint(w / (2 * h)), -j0, levels - 1 - j0) + j0).astype(np.int64)
    alphas = np.stack([best_h * 2.0 ** (bits - 1 - i) for i in range(bits)])
    signs = np.stack([((index >> (bits - 1 - i)) & 1) * 2.0 - 1 for i in range(bits)]) * mask
    return alphas, signs, np.where(best_h > 0, best_c, 0.0)


def _offset_units(z: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """The int8 multiple ``c`` of the last scale nearest the offset ``z`` (0 where that scale is 0)."""
    last = alphas[-1]
    c = np.rint(z / np.where(last > 0, last, 1.0))
    return np.where(last > 0, np.clip(c, -OFFSET_UNIT_MAX, OFFSET_UNIT_MAX), 0.0)


def _fit_offset_groups(w: np.ndarray, mask: np.ndarray, bits: int, scale: str, iterations: int,
                       weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BCQ with a per-group offset (``offset=True``): the best offset grid, then alternating
    refinement (the offset by least squares jointly with the scales, the scales of ``w - z``
    snapped, the offset rounded to a multiple of the last scale, the signs), keeping each
    group's best state among those with a level 0. Returns (alphas, signs, units c)."""
    alphas, signs, units = _offset_grid(w, mask, bits, scale, weights)
    wt = mask * (1.0 if weights is None else weights)

    def error(a: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
        z = _offset_values(a, c)
        err = np.sum(wt * (w - z[..., None] * mask - np.einsum("irg,irgl->rgl", a, s)) ** 2, axis=-1)
        return np.where(_has_zero_level(a, z), err, np.inf)

    best = (alphas, signs, units)
    best_err = error(*best)
    for _ in range(iterations):
        gram, rhs = _gram(np.concatenate([signs, mask[None].astype(np.float64)]), w)
        z = np.einsum("rgj,rgj->rg", np.linalg.pinv(gram)[..., -1, :], rhs)
        shifted = w - z[..., None] * mask
        alphas, signs = _least_squares_alphas(signs, shifted)
        alphas = _snap_alphas(alphas, signs, shifted, scale)
        units = _offset_units(z, alphas)
        signs = _best_signs(w - _offset_values(alphas, units)[..., None] * mask, alphas) * mask
        err = error(alphas, signs, units)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, alphas, best[0]), np.where(better[..., None], signs, best[1]),
                np.where(better, units, best[2]))
    return best


def _fit_groups(w: np.ndarray, mask: np.ndarray, bits: int, scale: str,
                iterations: int, zero_level: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """BCQ of padded groups ``w`` [R, G, L] (``mask`` False on padding): greedy then alternating
    refinement, keeping each group's best state. For pow2/apot2 the initial state is the
    best of greedy, the best power-of-two uniform grid and the pow2 dictionary, and only
    states that cover the group's peak (:func:`_coverage`) count. Returns (alphas [bits, R, G],
    signs [bits, R, G, L])."""
    alphas, signs = _greedy(w, mask, bits, scale)
    if scale != "fp16":  # greedy's signs need not be each weight's nearest level (nor a 0 one)
        signs = _best_signs(w, alphas) * mask
    peak = np.max(np.abs(w) * mask, axis=-1)

    def error(a: np.ndarray, s: np.ndarray) -> np.ndarray:
        err = _errors(w, a, s)
        if scale == "fp16":
            return err
        err = np.where(_covers(a.sum(axis=0), peak, bits), err, np.inf)
        return np.where(_has_zero_level(a), err, np.inf) if _wants_zero_level(bits, scale, zero_level) else err

    best_err = error(alphas, signs)
    if scale != "fp16":
        for c_alphas, c_signs in (_uniform_pow2_grid(w, mask, bits), _pow2_dictionary(w, mask, bits, _wants_zero_level(bits, scale, zero_level),
                                                         _apot2_shapes(bits) if scale == "apot2" else [])):
            c_err = error(c_alphas, c_signs)
            better = c_err < best_err
            best_err = np.where(better, c_err, best_err)
            alphas = np.where(better, c_alphas, alphas)
            signs = np.where(better[..., None], c_signs, signs)
    best_alphas, best_signs = alphas.copy(), signs.copy()
    for _ in range(iterations):
        alphas, signs = _least_squares_alphas(signs, w)
        if scale != "fp16":
            alphas = _snap_alphas(alphas, signs, w, scale)
        signs = _best_signs(w, alphas) * mask
        err = error(alphas, signs)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_alphas = np.where(better, alphas, best_alphas)
        best_signs = np.where(better[..., None], signs, best_signs)
    return best_alphas, best_signs


# ----------------------------------------------------------------------------- public API

def _grouped(w: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [N, K] as [N, G, group_size] (zero padded) and the mask of real weights."""
    n, k = w.shape
    groups = -(-k // group_size)
    padded = np.zeros((n, groups * group_size))
    padded[:, :k] = w
    mask = np.zeros(groups * group_size, dtype=bool)
    mask[:k] = True
    return padded.reshape(n, groups, group_size), np.broadcast_to(mask.reshape(groups, group_size), (n, groups, group_size))


def _validate(weight: np.ndarray, bits: int, group_size: int, scale: str, iterations: int) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim != 2 or 0 in w.shape:
        raise BCQFitError(f"weight must be a non-empty [out, in] matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise BCQFitError("weight has non-finite values")
    if not 1 <= bits <= 8:
        raise BCQFitError(f"bits must be in 1..8, got {bits}")
    if group_size < 1:
        raise BCQFitError(f"group_size must be >= 1, got {group_size}")
    if scale not in SCALES:
        raise BCQFitError(f"scale must be one of {SCALES}, got {scale!r}")
    if iterations < 0:
        raise BCQFitError(f"iterations must be >= 0, got {iterations}")
    return w.astype(np.float64)


def _result(alphas: np.ndarray, signs: np.ndarray, k: int, group_size: int, scale: str,
            offsets: np.ndarray | None = None) -> BCQFit:
    bits, n = alphas.shape[:2]
    if scale == "fp16":
        alphas = alphas.astype(np.float16)
    alphas32 = alphas.astype(np.float32)
    flat_signs = signs.reshape(bits, n, -1)[:, :, :k]
    return BCQFit(signs=np.where(flat_signs < 0, -1, 1).astype(np.int8), alphas=alphas32,
                  exponents=_exponents_of(alphas32, scale), group_size=group_size, scale=scale,
                  offset_units=None if offsets is None else offsets.astype(np.int8))


def fit_bcq(weight: np.ndarray, bits: int, group_size: int = 128, scale: str = "pow2",
            iterations: int = 10, hessian: np.ndarray | None = None, damp: float = 0.01,
            act_order: bool = False, refits: int = 2, zero_level: bool = False,
            offset: bool = False) -> BCQFit:
    """BCQ of ``weight`` [N, K] with ``bits`` planes and groups of ``group_size`` along K.

    Without ``hessian``: minimises the weight error (greedy + ``iterations`` rounds of
    alternating refinement). With ``hessian`` [K, K] (``∝ XᵀX``): GPTQ's column loop with each
    group's scales fitted on its compensated weights (see the module docstring).

    ``zero_level`` (pow2/apot2, bits >= 2): every group's scales give a level of exactly 0
    (e.g. pow2 3 bits: ``α = (2c, c, c)``, levels 0, ±2c, ±4c), at the cost of levels (see the
    module docstring); off: the best grid by weight error alone.

    ``offset`` (pow2/apot2): every group also gets a signed offset ``z`` (a pow2/apot2 value or
    0), ``W ≈ z + Σ α_i B_i``, and keeps a level 0 without losing levels (see "Offset" in the
    module docstring)."""
    w = _validate(weight, bits, group_size, scale, iterations)
    if offset and scale == "fp16":
        raise BCQFitError("offset needs pow2 or apot2 scales (fp16 is the plain-BCQ ablation)")
    if hessian is None:
        grouped, mask = _grouped(w, group_size)
        if offset:
            alphas, signs, offsets = _fit_offset_groups(grouped, mask, bits, scale, iterations)
            return _result(alphas, signs, w.shape[1], group_size, scale, offsets)
        alphas, signs = _fit_groups(grouped, mask, bits, scale, iterations, zero_level)
        return _result(alphas, signs, w.shape[1], group_size, scale)
    return _fit_bcq_hessian(w, bits, group_size, scale, iterations, hessian, damp, act_order, refits,
                            zero_level, offset)


def _fit_bcq_hessian(w: np.ndarray, bits: int, group_size: int, scale: str, iterations: int,
                     hessian: np.ndarray, damp: float, act_order: bool, refits: int,
                     zero_level: bool = False, offset: bool = False) -> BCQFit:
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise BCQFitError(f"hessian shape {h.shape} does not match in_features {k}")
    if not np.all(np.isfinite(h)):
        raise BCQFitError("hessian has non-finite values")
    if damp < 0:
        raise BCQFitError(f"damp must be >= 0, got {damp}")
    w = w.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # as GPTQ: a dead input's weight has no effect on the output
    loop = _ColumnLoop(w, h, group_size, damp, act_order, zero_level, offset)
    alphas, signs, offsets = loop.run(bits, scale, iterations)
    best_alphas, best_signs, best_offsets = alphas, signs, offsets
    best_err = _row_output_errors(w, h, alphas, signs, group_size, offsets)
    # refitted scales must still cover each group's peak (_coverage), or what the loop covered
    floor = np.minimum(_coverage(bits) * np.max(np.abs(_grouped(w, group_size)[0]), axis=-1), alphas.sum(axis=0))
    for _ in range(refits):  # output-optimal scales for these signs, then the loop's signs for them
        alphas, signs, offsets = _refit_alphas(w, h, alphas, signs, group_size, scale, offsets)
        for candidate in ((alphas, signs, offsets), loop.run(bits, scale, iterations, alphas, offsets)):
            err = _row_output_errors(w, h, candidate[0], candidate[1], group_size, candidate[2])
            if offset:  # the offset keeps a level 0 and replaces the coverage floor (clip searched)
                z = _offset_values(candidate[0], candidate[2])
                err = np.where(np.all(_has_zero_level(candidate[0], z), axis=-1), err, np.inf)
            elif scale != "fp16":
                err = np.where(np.all(candidate[0].sum(axis=0) >= floor * (1 - 1e-12), axis=-1), err, np.inf)
                if _wants_zero_level(bits, scale, zero_level):
                    err = np.where(np.all(_has_zero_level(candidate[0]), axis=-1), err, np.inf)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_alphas = np.where(better[None, :, None], candidate[0], best_alphas)
            best_signs = np.where(better[None, :, None], candidate[1], best_signs)
            if offset:
                best_offsets = np.where(better[:, None], candidate[2], best_offsets)
        alphas, signs, offsets = candidate
    return _result(best_alphas, best_signs, k, group_size, scale, best_offsets)


class _ColumnLoop:
    """GPTQ's column loop (see gptq.py) choosing each column's signs given its group's scales;
    the scales are fitted at the group's first column on the compensated weights, or given."""

    def __init__(self, w: np.ndarray, h: np.ndarray, group_size: int, damp: float, act_order: bool,
                 zero_level: bool = False, offset: bool = False, block_size: int = 128):
        from .gptq import inverse_hessian_cholesky
        k = w.shape[1]
        self.w, self.group_size, self.act_order, self.zero_level = w, group_size, act_order, zero_level
        self.offset = offset
        self.diag = np.diag(h).copy()  # per-column weights of the offset grids' clip search
        if act_order:  # columns by decreasing H diagonal; groups fitted up front (static groups)
            self.perm = np.argsort(-np.diag(h), kind="stable")
            h = h[np.ix_(self.perm, self.perm)]
            self.width = block_size
        else:
            self.perm = np.arange(k)
            self.width = group_size * max(1, block_size // group_size)
        self.u = inverse_hessian_cholesky(h, damp)

    def run(self, bits: int, scale: str, iterations: int, alphas: np.ndarray | None = None,
            units: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(alphas [bits, N, G], signs [bits, N, K], offset units [N, G] or None); ``alphas``
        (and ``units``) given: kept, only signs chosen."""
        n, k = self.w.shape
        gs = self.group_size
        groups = -(-k // gs)
        fixed = alphas is not None
        alphas = np.zeros((bits, n, groups)) if alphas is None else alphas.copy()
        units = (np.zeros((n, groups)) if units is None else units.copy()) if self.offset else None

        def fit(g: int, weights: np.ndarray) -> None:
            grouped, mask = _grouped(weights, weights.shape[1])
            if self.offset:
                cols = np.arange(g * gs, g * gs + weights.shape[1])
                a, _, z = _fit_offset_groups(grouped, mask, bits, scale, iterations, self.diag[cols])
                alphas[:, :, g], units[:, g] = a[:, :, 0], z[:, 0]
                return
            alphas[:, :, g] = _fit_groups(grouped, mask, bits, scale, iterations, self.zero_level)[0][:, :, 0]

        work = self.w[:, self.perm].copy()
        if self.act_order and not fixed:
            for g in range(groups):
                fit(g, self.w[:, g * gs:(g + 1) * gs])
        patterns = _sign_patterns(bits)  # [P, bits]
        chosen = np.zeros((n, k), dtype=np.int64)  # pattern index of every weight
        rows = np.arange(n)
        values = None
        u = self.u
        for b0 in range(0, k, self.width):
            b1 = min(b0 + self.width, k)
            block = work[:, b0:b1]  # a view: in-block updates land in ``work``
            errors = np.empty((n, b1 - b0))
            for j in range(b1 - b0):
                pos = b0 + j
                col = int(self.perm[pos])
                g = col // gs
                if not fixed and not self.act_order and col % gs == 0:
                    fit(g, block[:, j:j + min(gs, k - col)])
                if values is None or col % gs == 0 or self.act_order:
                    values = alphas[:, :, g].T @ patterns.T  # [N, P]: every level of the group
                    if units is not None:
                        values = values + (units[:, g] * alphas[-1, :, g])[:, None]
                target = block[:, j]
                best = np.argmin(np.abs(target[:, None] - values), axis=1)
                chosen[:, col] = best
                err = (target - values[rows, best]) / u[pos, pos]
                errors[:, j] = err
                block[:, j + 1:] -= np.outer(err, u[pos, pos + 1:b1])
            work[:, b1:] -= errors @ u[b0:b1, b1:]
        return alphas, np.moveaxis(patterns[chosen], -1, 0), units


def _dense(alphas: np.ndarray, signs: np.ndarray, group_size: int,
           units: np.ndarray | None = None) -> np.ndarray:
    k = signs.shape[2]
    q = np.einsum("ink,ink->nk", np.repeat(alphas, group_size, axis=2)[:, :, :k], signs)
    return q if units is None else q + np.repeat(_offset_values(alphas, units), group_size, axis=1)[:, :k]


def _row_output_errors(w: np.ndarray, h: np.ndarray, alphas: np.ndarray, signs: np.ndarray,
                       group_size: int, units: np.ndarray | None = None) -> np.ndarray:
    """``(w_n - q_n) H (w_n - q_n)ᵀ`` per row: the calibration output error of each output."""
    d = w - _dense(alphas, signs, group_size, units)
    return np.einsum("nk,nk->n", d @ h, d)


def _group_sums(x: np.ndarray, group_size: int) -> np.ndarray:
    """[N, K] -> [N, G]: sums over each group of columns (the last may be partial)."""
    n, k = x.shape
    groups = -(-k // group_size)
    padded = np.zeros((n, groups * group_size))
    padded[:, :k] = x
    return padded.reshape(n, groups, group_size).sum(axis=-1)


def _refit_alphas(w: np.ndarray, h: np.ndarray, alphas: np.ndarray, signs: np.ndarray, group_size: int,
                  scale: str, units: np.ndarray | None = None,
                  sweeps: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Scales given the signs that minimise the output error ``(w - q) H (w - q)ᵀ`` of each row
    (``q`` is linear in the row's ``bits · G`` scales): least squares for fp16; for pow2/apot2
    coordinate descent from the current scales, each step the representable value nearest the
    one-variable optimum (never worse: the error is a convex quadratic in one scale). A negative
    scale flips its plane's signs in its group. With offset ``units`` c (kept), the last plane
    is ``s + c``: its scale also scales the offset, and a flip negates ``c``."""
    k = signs.shape[2]
    planes = signs
    if units is not None:
        planes = signs.copy()
        planes[-1] = signs[-1] + np.repeat(units, group_size, axis=1)[:, :k]
    a = _refit_planes(w, h, alphas, planes, group_size, scale, sweeps)
    flip = np.where(a < 0, -1.0, 1.0)
    per_column = np.repeat(flip, group_size, axis=2)[:, :, :k]
    return np.abs(a), signs * per_column, None if units is None else units * flip[-1]


def _refit_planes(w: np.ndarray, h: np.ndarray, alphas: np.ndarray, signs: np.ndarray, group_size: int,
                  scale: str, sweeps: int) -> np.ndarray:
    """The signed scales [bits, N, G] of :func:`_refit_alphas` for planes ``signs`` (any values)."""
    bits, n, k = signs.shape
    groups = alphas.shape[2]
    v = bits * groups
    gram = np.zeros((n, v, v))
    for j in range(bits):
        for g in range(groups):
            cols = slice(g * group_size, min((g + 1) * group_size, k))
            z = signs[j][:, cols] @ h[cols, :]  # [N, K]: H applied to plane j's group g
            for i in range(bits):
                gram[:, i * groups:(i + 1) * groups, j * groups + g] = _group_sums(signs[i] * z, group_size)
    wh = w @ h
    rhs = np.concatenate([_group_sums(signs[i] * wh, group_size) for i in range(bits)], axis=1)  # [N, v]
    a = alphas.transpose(1, 0, 2).reshape(n, v).copy()
    if scale == "fp16":
        a = np.einsum("nij,nj->ni", np.linalg.pinv(gram), rhs)
    else:
        for _ in range(sweeps):
            for t in range(v):
                diag = gram[:, t, t]
                rest = rhs[:, t] - np.einsum("nj,nj->n", gram[:, t, :], a) + diag * a[:, t]
                opt = np.where(diag > 0, rest / np.where(diag > 0, diag, 1.0), 0.0)
                a[:, t] = np.sign(opt) * _nearest(np.abs(opt), scale)
    return a.reshape(n, bits, groups).transpose(1, 0, 2)
