"""N:M structured sparsity: choosing the kept weights and compressing them with index metadata.

In every block of M consecutive weights of a row, N are kept (NVIDIA's 2:4 sparse tensor
cores; Mishra et al. 2021). Selection is by magnitude, or activation-aware by |W| * ||X_k||
(Wanda, Sun et al. 2023) when a per-input-column scale is given. A compressed row holds the
kept values in order and, for each, its index inside its block (ascending within a block);
``bitsmith.ir.quantized`` stores those indices packed at log2(M) bits.
"""

from __future__ import annotations

import numpy as np

from bitsmith.ir.quantized import parse_sparsity
from bitsmith.ir.types import IRTypeError


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); N:M needs 0 < N <= M and M a power of two (a ValueError otherwise)."""
    try:
        nm = parse_sparsity(pattern)
    except IRTypeError as e:
        raise ValueError(f"{e} (e.g. 2:4, 4:8, 8:16)") from None
    if nm is None:
        raise ValueError("empty sparsity pattern; give N:M, e.g. 2:4")
    return nm


def _blocks(w: np.ndarray, m: int) -> np.ndarray:
    rows, k = w.shape
    if k % m:
        raise ValueError(f"N:M sparsity needs the row length {k} to be a multiple of M = {m}")
    return w.reshape(rows, k // m, m)


def nm_mask(w: np.ndarray, n: int, m: int, column_scale: np.ndarray | None = None) -> np.ndarray:
    """bool [N, K]: exactly ``n`` of every ``m`` consecutive weights of each row are True, those
    with the largest ``|w| * column_scale[k]`` (ties to the lower index)."""
    score = np.abs(np.asarray(w, dtype=np.float64))
    if column_scale is not None:
        column_scale = np.asarray(column_scale, dtype=np.float64)
        if column_scale.shape != (score.shape[1],):
            raise ValueError(f"column_scale must have shape ({score.shape[1]},), got {column_scale.shape}")
        score = score * column_scale[None, :]
    blocks = _blocks(score, m)
    # stable sort of -score: among equal scores the lower index comes first
    keep = np.argsort(-blocks, axis=-1, kind="stable")[..., :n]
    mask = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return mask.reshape(score.shape)


def compress_nm(w: np.ndarray, mask: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept values [N, K/m*n], index codes uint8 [N, K/m*n]) of the True weights of an N:M
    mask, in row order; each index is the weight's position inside its block of m."""
    w, mask = np.asarray(w), np.asarray(mask, dtype=bool)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {mask.shape} != weight shape {w.shape}")
    mask_blocks = _blocks(mask, m)
    if not (mask_blocks.sum(axis=-1) == n).all():
        raise ValueError(f"mask does not keep exactly {n} of every {m} weights")
    # stable argsort of ~mask lists the kept positions first, in ascending order
    index = np.argsort(~mask_blocks, axis=-1, kind="stable")[..., :n]
    kept = np.take_along_axis(_blocks(w, m), index, axis=-1)
    rows = w.shape[0]
    return kept.reshape(rows, -1), index.reshape(rows, -1).astype(np.uint8)


def expand_nm(kept: np.ndarray, index_codes: np.ndarray, n: int, m: int, k: int) -> np.ndarray:
    """Inverse of :func:`compress_nm`: the dense [N, k] matrix, zero where nothing was kept."""
    kept = np.asarray(kept)
    rows = kept.shape[0]
    if kept.shape != (rows, k // m * n) or index_codes.shape != kept.shape or k % m:
        raise ValueError(f"kept {kept.shape} / index {index_codes.shape} do not fit {n}:{m} of {k} columns")
    cols = (np.arange(kept.shape[1]) // n) * m + index_codes.astype(np.int64)
    dense = np.zeros((rows, k), dtype=kept.dtype)
    np.put_along_axis(dense, cols, kept, axis=1)
    return dense
