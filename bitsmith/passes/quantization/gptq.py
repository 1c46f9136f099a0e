"""GPTQ: column-by-column quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, Algorithm 1. For a layer ``y = x Wᵀ`` and
calibration inputs ``X`` [tokens, K], GPTQ minimises ``||X Wᵀ - X Qᵀ||²`` greedily: columns
are quantized in order, and each column's error, divided by the diagonal of the upper
Cholesky factor ``U`` of ``H⁻¹`` (``H ∝ XᵀX``), is propagated to the columns not yet
quantized through the matching row of ``U``. Updates to far columns are deferred and applied
one block at a time ("lazy batch updates").

Group parameters (scale, zero point, grid selector) are fitted at the first column of each
group, on the group's weights as they stand then, i.e. after compensation for all earlier
columns (the paper's ``act-order=False``, ``static_groups=False`` variant). Blocks are aligned
to groups so those weights are exact when the group is fitted.

``act_order=True`` quantizes the columns in order of decreasing Hessian diagonal (the paper's
"act-order", from its reference code), so the columns whose activations carry the most energy
are quantized first, while the most columns remain to absorb their error. Groups stay
contiguous in the stored (original) column order: every group is fitted up front, on the
weights as given, before any compensation (the reference code's ``static_groups``), so no
per-column group index is stored and the qlinear format is unchanged; only the processing
order is permuted, and codes are written back at their original columns.

Weights excluded by ``mask`` (False: outliers kept in fp16 by the ``outliers`` pass) are taken
to keep their original value exactly: they are left out of group fitting, and the difference
between the original value and the compensated target at that position is propagated like any
quantization error, so the remaining weights compensate for it.
"""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.ir.quant_grids import Scheme

from bitsmith.ir.code_packing import group_count

from .groups import GroupParams, QuantizedMatrix, decode, fit_groups, quantize_to_params


class GPTQError(BitsmithError, ValueError):
    """GPTQ could not run on the given weight and Hessian."""


def inverse_hessian_cholesky(hessian: np.ndarray, damp: float = 0.01, retries: int = 6) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``,
    i.e. ``(H + λI)⁻¹ = UᵀU``.

    Computed without forming the inverse: the lower Cholesky factor ``L'`` of ``P H P`` (``P`` reverses
    rows and columns) gives ``H = R Rᵀ`` with ``R = P L' P`` upper triangular, so
    ``H⁻¹ = (R⁻¹)ᵀ R⁻¹`` and ``U = R⁻¹`` (both factors are unique with a positive diagonal).
    ``H`` must already have its dead columns fixed (diagonal > 0). When the damped ``H`` is still
    not positive definite numerically, ``λ`` grows tenfold, up to ``retries`` times.
    """
    h = np.array(hessian, dtype=np.float64)
    mean_diag = float(np.mean(np.diag(h)))
    lam = damp * mean_diag
    for _ in range(retries + 1):
        damped = h + lam * np.eye(len(h))
        try:
            lower = np.linalg.cholesky(np.ascontiguousarray(damped[::-1, ::-1]))
        except np.linalg.LinAlgError:
            lam = max(lam * 10, 1e-8 * max(mean_diag, 1.0))
            continue
        return upper_triangular_inverse(np.ascontiguousarray(lower[::-1, ::-1]))
    raise GPTQError(f"Hessian is not positive definite even with damping {lam:g}; "
                    f"raise damp (now {damp}) or use more calibration tokens")


def upper_triangular_inverse(r: np.ndarray, leaf: int = 128) -> np.ndarray:
    """Inverse of an upper-triangular matrix by blocks,
    ``[[A, B], [0, C]]⁻¹ = [[A⁻¹, -A⁻¹ B C⁻¹], [0, C⁻¹]]``: mostly matrix products, several
    times faster than a general inverse with numpy's LAPACK."""
    n = len(r)
    if n <= leaf:
        return np.triu(np.linalg.inv(r))
    m = n // 2
    a_inv = upper_triangular_inverse(r[:m, :m], leaf)
    c_inv = upper_triangular_inverse(r[m:, m:], leaf)
    out = np.zeros_like(r)
    out[:m, :m] = a_inv
    out[m:, m:] = c_inv
    out[:m, m:] = -(a_inv @ r[:m, m:]) @ c_inv
    return out


def _block_width(group_size: int, block_size: int) -> int:
    # A block holds whole groups, so a group's weights are all current when it is fitted.
    return group_size * max(1, block_size // group_size)


def gptq_quantize_matrix(w: np.ndarray, hessian: np.ndarray, scheme: Scheme, group_size: int,
                         mask: np.ndarray | None = None, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False) -> QuantizedMatrix:
    """Quantizes ``w`` [N, K] with GPTQ against ``hessian`` [K, K] (``∝ XᵀX``; any positive
    factor gives the same result).

    Returns codes [N, K] (unpacked), fp16 scales [N, G] and zero points / selectors [N, G] where
    the scheme has them, ``G = ceil(K / group_size)``; ``dequantize_matrix`` of the result gives
    exactly the values the algorithm chose, except at ``mask == False`` positions, whose codes
    are meaningless because the caller stores those weights exactly.

    Dead inputs (``H[k, k] == 0``: always-zero activations) get ``H[k, k] = 1`` and weight 0,
    as in the reference implementation: their weight has no effect on the output.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise GPTQError(f"weight must be [out, in], got shape {w.shape}")
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (k, k):
        raise GPTQError(f"Hessian shape {h.shape} does not match in_features {k}")
    if group_size < 1 or block_size < 1 or damp < 0:
        raise GPTQError(f"need group_size >= 1, block_size >= 1, damp >= 0; "
                        f"got {group_size}, {block_size}, {damp}")
    keep = None if mask is None else np.asarray(mask, dtype=bool)
    if keep is not None and keep.shape != w.shape:
        raise GPTQError(f"mask shape {keep.shape} does not match weight {w.shape}")

    work = w.astype(np.float64)  # the error-compensated weights still to be quantized
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    work[:, dead] = 0.0

    groups = group_count(k, group_size)
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, groups), dtype=np.float16)
    zeros = np.zeros((n, groups), dtype=np.uint8) if scheme.asymmetric else None
    selectors = np.zeros((n, groups), dtype=np.uint8) if scheme.selector_bits else None

    def store(g: int, params: GroupParams) -> GroupParams:
        scales[:, g] = params.scale
        if zeros is not None:
            zeros[:, g] = params.zero
        if selectors is not None:
            selectors[:, g] = params.selector
        return params

    def fit(g: int, weights: np.ndarray) -> GroupParams:
        c0, c1 = g * group_size, min((g + 1) * group_size, k)
        return store(g, fit_groups(weights.astype(np.float32), scheme, None if keep is None else keep[:, c0:c1]))

    static: list[GroupParams] | None = None
    if act_order:  # columns by decreasing H diagonal; groups fitted up front (static groups)
        perm = np.argsort(-np.diag(h), kind="stable")
        static = [fit(g, work[:, g * group_size:(g + 1) * group_size]) for g in range(groups)]
        h = h[np.ix_(perm, perm)]
        work = work[:, perm]
        width = block_size
    else:
        perm = np.arange(k)
        width = _block_width(group_size, block_size)
    u = inverse_hessian_cholesky(h, damp)

    params: GroupParams | None = None
    for b0 in range(0, k, width):
        b1 = min(b0 + width, k)
        block = work[:, b0:b1]  # a view: in-block updates land in ``work``
        errors = np.empty((n, b1 - b0), dtype=np.float64)
        for j in range(b1 - b0):
            pos = b0 + j
            col = int(perm[pos])  # the stored column; pos == col without act_order
            if static is not None:
                params = static[col // group_size]
            elif col % group_size == 0:
                params = fit(col // group_size, block[:, j:j + min(group_size, k - col)])
            target = block[:, j]
            c = quantize_to_params(target[:, None].astype(np.float32), params, scheme)
            q = decode(c, params, scheme)[:, 0].astype(np.float64)
            if keep is not None:
                q = np.where(keep[:, col], q, w[:, col])  # outliers keep their original value
            codes[:, col] = c[:, 0]
            err = (target - q) / u[pos, pos]
            errors[:, j] = err
            block[:, j + 1:] -= np.outer(err, u[pos, pos + 1:b1])
        work[:, b1:] -= errors @ u[b0:b1, b1:]
    return QuantizedMatrix(codes=codes, scales=scales, zeros=zeros, selectors=selectors)
