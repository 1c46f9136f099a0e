"""Decoding (greedy or sampled, see ``sampling``) over a causal-LM module's cached ``main`` function.

``main`` takes (input_ids, position_ids, past_key_0, past_value_0, ...) and returns
(logits, present_key_0, present_value_0, ...): one function serves prefill (past length 0)
and every one-token decode step.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from ..ir import Module
from ..ir import symbolic as sym
from .sampling import SamplingConfig, next_tokens

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


class Streamer(Protocol):
    """transformers' streamer interface: ``put`` gets each step's new ids [batch] (the prompt
    first, [batch, seq]), ``end`` is called once when generation stops."""

    def put(self, value: np.ndarray) -> None: ...

    def end(self) -> None: ...


def stop_ids(eos_token_id: int | Sequence[int] | None) -> np.ndarray:
    """``eos_token_id`` as transformers takes it (an id, a list of ids, or None) as an array."""
    if eos_token_id is None:
        return np.zeros(0, dtype=np.int64)
    ids = np.atleast_1d(np.asarray(eos_token_id))
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise ValueError(f"eos_token_id must be a non-negative id or a list of them, got {eos_token_id!r}")
    return ids.astype(np.int64)


def decode_generate(run: RunFn, module: Module, input_ids: np.ndarray, max_new_tokens: int,
                    eos_token_id: int | Sequence[int] | None = None,
                    sampling: SamplingConfig = SamplingConfig(), pad_token_id: int | None = None,
                    stop_check: Callable[[np.ndarray], np.ndarray] | None = None,
                    streamer: Streamer | None = None) -> np.ndarray:
    """Returns [batch, prompt + new] token ids, like transformers' ``generate``.

    A row finishes when it produces one of ``eos_token_id`` or when ``stop_check`` (given the
    ids so far, [batch, n]) returns True for it; finished rows are padded with ``pad_token_id``
    (default: the first eos id) and generation ends when every row has finished.
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
    eos = stop_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else None)
    if pad is None and stop_check is not None and b > 1:
        raise ValueError("stop strings on a batch need pad_token_id or eos_token_id to pad finished rows")
    rng = sampling.generator()
    cache = empty_cache(module, b)
    step_ids, start = ids, 0
    finished = np.zeros(b, dtype=bool)
    out = ids
    if streamer is not None:
        streamer.put(ids)
    for _ in range(max_new_tokens):
        logits, *cache = run("main", [step_ids, positions(b, start, step_ids.shape[1]), *cache])
        start += step_ids.shape[1]
        nxt = next_tokens(logits[:, -1], out, sampling, rng)
        if pad is not None:
            nxt = np.where(finished, pad, nxt)
        out = np.concatenate([out, nxt[:, None]], axis=1)
        if streamer is not None:
            streamer.put(nxt)
        finished |= np.isin(nxt, eos)
        if stop_check is not None:
            finished |= np.asarray(stop_check(out), dtype=bool)
        step_ids = nxt[:, None]
        if finished.all():
            break
    if streamer is not None:
        streamer.end()
    return out
