"""Greedy decoding over a causal-LM module's cached ``main`` function.

``main`` takes (input_ids, position_ids, past_key_0, past_value_0, ...) and returns
(logits, present_key_0, present_value_0, ...): one function serves prefill (past length 0)
and every one-token decode step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..ir import Module
from ..ir import symbolic as sym

RunFn = Callable[[str, Sequence[np.ndarray]], list[np.ndarray]]


def empty_cache(module: Module, batch: int) -> list[np.ndarray]:
    """Zero-length past key/value arrays shaped as ``main`` expects."""
    fn = module.function("main")
    out = []
    for p in fn.params[2:]:
        shape = tuple(sym.evaluate(d, {"batch": batch, "past": 0}) for d in p.type.shape)
        out.append(np.zeros(shape, dtype=np.float32 if p.type.dtype == "float32" else p.type.dtype))
    return out


def positions(batch: int, start: int, length: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy()


def forward_logits(run: RunFn, module: Module, input_ids: np.ndarray) -> np.ndarray:
    """Logits for every position of ``input_ids`` [batch, seq], starting from an empty cache."""
    b, s = input_ids.shape
    logits, *_ = run("main", [input_ids, positions(b, 0, s), *empty_cache(module, b)])
    return logits


def greedy_generate(run: RunFn, module: Module, input_ids: np.ndarray, max_new_tokens: int,
                    eos_token_id: int | None = None) -> np.ndarray:
    """Returns [batch, prompt + new] token ids, like transformers' greedy ``generate``.

    Stops early only when ``eos_token_id`` is given and every row has produced it; rows that
    finished earlier are padded with ``eos_token_id``.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    b, s = ids.shape
    limit = module.attr("max_positions")
    if isinstance(limit, int) and s + max_new_tokens > limit:
        raise ValueError(f"prompt ({s} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{limit} positions")
    cache = empty_cache(module, b)
    step_ids, start = ids, 0
    finished = np.zeros(b, dtype=bool)
    out = [ids]
    for _ in range(max_new_tokens):
        logits, *cache = run("main", [step_ids, positions(b, start, step_ids.shape[1]), *cache])
        start += step_ids.shape[1]
        nxt = logits[:, -1].argmax(axis=-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(finished, eos_token_id, nxt)
            finished |= nxt == eos_token_id
        out.append(nxt[:, None])
        step_ids = nxt[:, None]
        if eos_token_id is not None and finished.all():
            break
    return np.concatenate(out, axis=1)
