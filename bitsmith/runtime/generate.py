"""Decoding (greedy or sampled, see ``sampling``) over a causal-LM module's cached ``main`` function.

``main`` takes (input_ids, position_ids, past_key_0, past_value_0, ..., [attention_mask]) and
returns (logits, present_key_0, present_value_0, ...): one function serves prefill (past
length 0) and every one-token decode step. ``attention_mask`` [batch, past + seq] (1 = attend)
is the last parameter of artifacts compiled since issue 14 and is optional: ``main_args``
fills ones when the caller has none. Rows of different lengths share a batch through it
(left-padded prompts); artifacts without it run equal-length batches only and refuse a mask
with zeros (``RaggedBatchError``). See docs/ragged-batches.md.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol, Sequence

import numpy as np

from ..ir import Module
from ..ir import symbolic as sym
from .padding import check_attention_mask, mask_positions
from .sampling import SamplingConfig, next_tokens

RunFn = Callable[[str, Sequence[np.ndarray]], list[np.ndarray]]
MASK_PARAM = "attention_mask"  # the name the kv-cache pass gives it (passes/kv_cache.py)
CAPACITY_STEP = 64  # fixed-capacity caches round up to this, so nearby lengths share buffers


def round_capacity(tokens: int, step: int = CAPACITY_STEP) -> int:
    """A fixed-capacity cache's length for ``tokens`` (tvm-cuda's device decode, CPU in-place caches)."""
    return -(-tokens // step) * step


class CacheSession(Protocol):
    """KV caches of fixed capacity updated in place (an executable's ``kv_session()``): slot j of
    each cache is column j of the attention mask, as ``present``'s column j is on the concat path.
    ``caches`` (one [rows, kv_heads, capacity, dim] array per cache input, zeros after ``start``)
    may be read and written between steps; ``step`` runs on their first ``batch`` rows and with
    ``last_only`` returns the logits of the last position only, [batch, 1, vocab]."""

    caches: list[np.ndarray]

    def start(self, batch: int, capacity: int) -> None: ...

    def step(self, ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             last_only: bool = False) -> np.ndarray: ...


class RaggedBatchError(ValueError):
    """A batch with padding (an attention mask with zeros) for an artifact whose ``main`` has no
    attention_mask input."""


def has_attention_mask(module: Module) -> bool:
    """Whether ``main`` takes an attention_mask (artifacts compiled since issue 14)."""
    return any(p.name == MASK_PARAM for p in module.function("main").params)


def main_args(module: Module, input_ids: np.ndarray, position_ids: np.ndarray, cache: Sequence[np.ndarray],
              attention_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """The argument list of ``main``: ids, positions, caches and, where ``main`` takes one, the
    attention mask [batch, past + seq] (all ones when None)."""
    args = [input_ids, position_ids, *cache]
    if has_attention_mask(module):
        if attention_mask is None:
            past = cache[0].shape[2] if cache else 0
            attention_mask = np.ones((input_ids.shape[0], past + input_ids.shape[1]), dtype=np.int64)
        args.append(np.ascontiguousarray(attention_mask, dtype=np.int64))
    elif attention_mask is not None and not np.all(attention_mask):
        raise RaggedBatchError(
            "this artifact's main has no attention_mask input (it was compiled before attention "
            "masks): it runs only batches of equal-length prompts; run the prompts one at a time "
            "or recompile the model with this version of bitsmith")
    return args


def empty_cache(module: Module, batch: int) -> list[np.ndarray]:
    """Zero-length past key/value arrays shaped as ``main`` expects."""
    fn = module.function("main")
    out = []
    for p in fn.params[2:]:
        if p.name == MASK_PARAM:
            continue
        shape = tuple(sym.evaluate(d, {"batch": batch, "past": 0}) for d in p.type.shape)
        out.append(np.zeros(shape, dtype=np.float32 if p.type.dtype == "float32" else p.type.dtype))
    return out


def positions(batch: int, start: int, length: int) -> np.ndarray:
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (batch, length)).copy()


def forward_logits(run: RunFn, module: Module, input_ids: np.ndarray,
                   attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits for every position of ``input_ids`` [batch, seq], starting from an empty cache;
    with ``attention_mask``, padded positions do not attend nor are attended to (their own
    logits are meaningless)."""
    b, s = input_ids.shape
    pos = positions(b, 0, s) if attention_mask is None else mask_positions(attention_mask)
    logits, *_ = run("main", main_args(module, input_ids, pos, empty_cache(module, b), attention_mask))
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
                    streamer: Streamer | None = None,
                    attention_mask: np.ndarray | None = None,
                    session: CacheSession | None = None) -> np.ndarray:
    """Returns [batch, prompt + new] token ids, like transformers' ``generate``.

    ``attention_mask`` [batch, prompt] (1 = token, 0 = left padding) lets prompts of different
    lengths share the batch; each row then gets the positions and logits it would get alone.

    A row finishes when it produces one of ``eos_token_id`` or when ``stop_check`` (given the
    ids so far, [batch, n]) returns True for it; finished rows are padded with ``pad_token_id``
    (default: the first eos id) and generation ends when every row has finished.

    With ``session`` the caches live in it at capacity prompt + max_new_tokens (rounded) and each
    step writes its keys in place; without, ``main`` returns ``concat(past, new)`` every step.
    Both give the same logits, except that the prompt step asks a session for the last
    position's only (``last_only``, where its ``step`` takes it), which may sum in another order
    (float rounding; greedy tokens then differ only at a near-tie).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
    b, s = ids.shape
    mask = None if attention_mask is None else check_attention_mask(attention_mask, ids.shape)
    longest = s if mask is None else int(mask.sum(axis=1).max())
    limit = module.attr("max_positions")
    if isinstance(limit, int) and longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{limit} positions")
    eos = stop_ids(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else None)
    if pad is None and stop_check is not None and b > 1:
        raise ValueError("stop strings on a batch need pad_token_id or eos_token_id to pad finished rows")
    rng = sampling.generator()
    cache = empty_cache(module, b) if session is None else []
    if session is not None:
        session.start(b, round_capacity(s + max_new_tokens))
        takes_last_only = "last_only" in inspect.signature(session.step).parameters  # plugins' sessions may not
    step_ids, start = ids, 0
    finished = np.zeros(b, dtype=bool)
    out = ids
    if streamer is not None:
        streamer.put(ids)
    for _ in range(max_new_tokens):
        n = step_ids.shape[1]
        pos = positions(b, start, n) if mask is None else mask_positions(mask)[:, -n:]
        if session is None:
            logits, *cache = run("main", main_args(module, step_ids, pos, cache, mask))
        else:
            live = mask if mask is not None else np.ones((b, start + n), dtype=np.int64)
            logits = (session.step(step_ids, pos, live, last_only=True) if takes_last_only
                      else session.step(step_ids, pos, live))
        start += n
        if mask is not None:
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
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
