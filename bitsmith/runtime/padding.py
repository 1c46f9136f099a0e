"""Ragged batches the transformers way: prompts of different lengths left-padded into one
[batch, seq] array with an attention mask (1 = token, 0 = padding), and the per-row position
ids that give each row what it would get alone (docs/ragged-batches.md)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both int64 [batch, longest]: each prompt right-aligned."""
    rows = [np.asarray(list(p), dtype=np.int64) for p in prompts]
    if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
        raise ValueError("a ragged batch needs one or more non-empty lists of token ids")
    longest = max(r.size for r in rows)
    ids = np.full((len(rows), longest), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, longest - r.size:] = r
        mask[i, longest - r.size:] = 1
    return ids, mask


def mask_positions(attention_mask: np.ndarray) -> np.ndarray:
    """Per-row position ids of a (left-)padded batch: each real token's index among its row's
    real tokens, as transformers computes them (cumsum - 1; padding gets 0)."""
    return np.maximum(np.cumsum(attention_mask != 0, axis=1, dtype=np.int64) - 1, 0)


def check_attention_mask(attention_mask: object, shape: tuple[int, ...]) -> np.ndarray:
    """``attention_mask`` as an int64 [batch, seq] array of zeros and ones matching the ids;
    every row must attend to its last token (left padding)."""
    mask = np.asarray(attention_mask)
    if mask.shape != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, got {mask.shape}")
    if (mask.dtype != bool and not np.issubdtype(mask.dtype, np.integer)) or not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (attend)")
    if shape[1] and not mask[:, -1].all():
        raise ValueError("attention_mask: every row's last token must be attended (pad on the left, "
                         "as transformers does for generation)")
    return mask.astype(np.int64)
