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
``B``, then for every weight the best of the ``2^bits`` sign patterns given ``α``. For pow2 and
apot2 the least-squares ``α`` are snapped by a joint search over the neighbouring representable
values of all planes (exact group error from the planes' Gram matrix), then coordinate descent;
each group keeps the best state it has seen, so refinement never increases the error of the
initialisation (groups are independent: the error is a sum over groups).

With a calibration Hessian ``H ∝ XᵀX`` the fit runs inside GPTQ's column loop (Frantar et al.,
ICLR 2023; ShiftAddLLM §3.2 "multi-objective optimization"): each group's scales are fitted to
the group's weights after compensation for the earlier columns (weight objective), each
column's signs are chosen given those scales and its error is pushed onto the columns not yet
quantized (output objective).
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

    @property
    def bits(self) -> int:
        return int(self.signs.shape[0])

    def reconstruct(self) -> np.ndarray:
        """float32 [N, K]: ``Σ_i α[i]`` (broadcast over its group) ``· B[i]``."""
        k = self.signs.shape[2]
        per_column = np.repeat(self.alphas, self.group_size, axis=2)[:, :, :k]
        return np.sum(per_column * self.signs.astype(np.float32), axis=0, dtype=np.float32)


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
    return np.einsum("irgl,jrgl->rgij", signs, signs), np.einsum("irgl,rgl->rgi", signs, w)


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


UNIFORM_SPAN = 40  # octaves below the group's peak searched for the uniform grid's step


def _uniform_pow2_grid(w: np.ndarray, mask: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The best symmetric uniform grid ``±h·(1, 3, ..., 2^bits - 1)`` with ``h`` a power of two,
    per group, as BCQ: alphas ``(2^(bits-1) h, ..., 2h, h)`` and the binary digits of each
    weight's level as signs. It is what round-to-nearest with a power-of-two scale gives, and a
    pow2 BCQ can always reach it, so the fit starts no worse (outlier groups included)."""
    levels = 2 ** bits
    peak = np.max(np.abs(w), axis=-1)
    top = np.ceil(np.log2(np.maximum(peak, np.finfo(np.float64).tiny))) + 1
    best_err = np.full(peak.shape, np.inf)
    best_h = np.zeros(peak.shape)
    for d in range(bits, bits + UNIFORM_SPAN + 1):
        h = np.exp2(np.clip(top - d, _EXP_MIN, _EXP_MAX - bits))[..., None]
        m = np.clip(np.rint((w / h + levels - 1) / 2), 0, levels - 1)
        err = np.sum(((w - h * (2 * m - levels + 1)) * mask) ** 2, axis=-1)
        better = err < best_err
        best_err, best_h = np.where(better, err, best_err), np.where(better, h[..., 0], best_h)
    best_h = np.where(peak > 0, best_h, 0.0)
    h = best_h[..., None]
    m = np.clip(np.rint((w / np.where(h > 0, h, 1.0) + levels - 1) / 2), 0, levels - 1).astype(np.int64)
    alphas = np.stack([best_h * 2.0 ** (bits - 1 - i) for i in range(bits)])
    signs = np.stack([((m >> (bits - 1 - i)) & 1) * 2.0 - 1 for i in range(bits)]) * mask
    return alphas, signs


def _shape_drops(bits: int) -> list[tuple[int, ...]]:
    """Exponent drops between consecutive planes searched by :func:`_pow2_dictionary`
    (``alphas ∝ 2^0, 2^-d1, 2^-d1-d2, ...``); fewer per drop as the combinations multiply."""
    drops = range(4) if bits <= 3 else range(3) if bits == 4 else range(1, 3)
    return list(itertools.product(drops, repeat=bits - 1))


def _pow2_dictionary(w: np.ndarray, mask: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The best pow2 BCQ grid per group among a dictionary: every shape of
    :func:`_shape_drops`, each at the four powers of two that put its top level between a
    quarter and twice the group's peak, every weight at its nearest level (exact error, unlike
    a least-squares step followed by rounding, which stalls at the uniform grid: the nearest
    powers of two of the least-squares scales are the grid it started from)."""
    peak = np.max(np.abs(w), axis=-1)
    best_err = np.full(peak.shape, np.inf)
    best = np.zeros((bits,) + peak.shape)
    patterns = _sign_patterns(bits)
    for drops in _shape_drops(bits):
        shape = np.exp2(-np.concatenate([[0], np.cumsum(drops)]))
        levels = np.unique(patterns @ shape)
        mids = (levels[1:] + levels[:-1]) / 2
        base = np.floor(np.log2(np.maximum(peak, np.finfo(np.float64).tiny) / shape.sum()))
        for offset in (-2, -1, 0, 1):
            c = np.exp2(np.clip(base + offset, _EXP_MIN, _EXP_MAX - 3))[..., None]
            x = w / c
            q = levels[np.searchsorted(mids, x)]
            err = np.sum(((x - q) * mask) ** 2, axis=-1) * c[..., 0] ** 2
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best = np.where(better, c[..., 0] * shape[:, None, None], best)
    best = np.where(peak > 0, best, 0.0)
    return best, _best_signs(w, best) * mask


def _fit_groups(w: np.ndarray, mask: np.ndarray, bits: int, scale: str,
                iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """BCQ of padded groups ``w`` [R, G, L] (``mask`` False on padding): greedy then alternating
    refinement, keeping each group's best state. For pow2/apot2 the initial state is the
    better of greedy and the best power-of-two uniform grid. Returns (alphas [bits, R, G],
    signs [bits, R, G, L])."""
    alphas, signs = _greedy(w, mask, bits, scale)
    best_err = _errors(w, alphas, signs)
    if scale != "fp16":
        for c_alphas, c_signs in (_uniform_pow2_grid(w, mask, bits), _pow2_dictionary(w, mask, bits)):
            c_err = _errors(w, c_alphas, c_signs)
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
        err = _errors(w, alphas, signs)
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


def _result(alphas: np.ndarray, signs: np.ndarray, k: int, group_size: int, scale: str) -> BCQFit:
    bits, n = alphas.shape[:2]
    if scale == "fp16":
        alphas = alphas.astype(np.float16)
    alphas32 = alphas.astype(np.float32)
    flat_signs = signs.reshape(bits, n, -1)[:, :, :k]
    return BCQFit(signs=np.where(flat_signs < 0, -1, 1).astype(np.int8), alphas=alphas32,
                  exponents=_exponents_of(alphas32, scale), group_size=group_size, scale=scale)


def fit_bcq(weight: np.ndarray, bits: int, group_size: int = 128, scale: str = "pow2",
            iterations: int = 10, hessian: np.ndarray | None = None, damp: float = 0.01,
            act_order: bool = False) -> BCQFit:
    """BCQ of ``weight`` [N, K] with ``bits`` planes and groups of ``group_size`` along K.

    Without ``hessian``: minimises the weight error (greedy + ``iterations`` rounds of
    alternating refinement). With ``hessian`` [K, K] (``∝ XᵀX``): GPTQ's column loop with each
    group's scales fitted on its compensated weights (see the module docstring)."""
    w = _validate(weight, bits, group_size, scale, iterations)
    if hessian is None:
        grouped, mask = _grouped(w, group_size)
        alphas, signs = _fit_groups(grouped, mask, bits, scale, iterations)
        return _result(alphas, signs, w.shape[1], group_size, scale)
    return _fit_bcq_hessian(w, bits, group_size, scale, iterations, hessian, damp, act_order)


def _fit_bcq_hessian(w: np.ndarray, bits: int, group_size: int, scale: str, iterations: int,
                     hessian: np.ndarray, damp: float, act_order: bool, block_size: int = 128) -> BCQFit:
    from .gptq import inverse_hessian_cholesky

    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise BCQFitError(f"hessian shape {h.shape} does not match in_features {k}")
    work = w.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0
    groups = -(-k // group_size)
    alphas = np.zeros((bits, n, groups))
    signs = np.zeros((bits, n, k))

    def fit(g: int, weights: np.ndarray) -> None:
        grouped, mask = _grouped(weights, weights.shape[1])
        a, _ = _fit_groups(grouped, mask, bits, scale, iterations)
        alphas[:, :, g] = a[:, :, 0]

    if act_order:  # static groups: every group fitted on the weights as given
        perm = np.argsort(-np.diag(h), kind="stable")
        for g in range(groups):
            fit(g, work[:, g * group_size:(g + 1) * group_size])
        h = h[np.ix_(perm, perm)]
        work = work[:, perm]
        width = block_size
    else:
        perm = np.arange(k)
        width = group_size * max(1, block_size // group_size)
    u = inverse_hessian_cholesky(h, damp)

    for b0 in range(0, k, width):
        b1 = min(b0 + width, k)
        block = work[:, b0:b1]
        errors = np.empty((n, b1 - b0))
        for j in range(b1 - b0):
            pos = b0 + j
            col = int(perm[pos])
            g = col // group_size
            if not act_order and col % group_size == 0:
                fit(g, block[:, j:j + min(group_size, k - col)])
            target = block[:, j]
            s = _best_signs(target[:, None, None], alphas[:, :, g:g + 1])[:, :, 0, 0]  # [bits, N]
            q = np.einsum("in,in->n", alphas[:, :, g], s)
            signs[:, :, col] = s
            err = (target - q) / u[pos, pos]
            errors[:, j] = err
            block[:, j + 1:] -= np.outer(err, u[pos, pos + 1:b1])
        work[:, b1:] -= errors @ u[b0:b1, b1:]
    return _result(alphas, signs.reshape(bits, n, k), k, group_size, scale)
