"""Perplexity of a compiled causal LM over fixed windows of a token stream.

Protocol (the usual "first N non-overlapping windows" evaluation, e.g. the GPTQ and BitMoD
papers' WikiText/C4 numbers): split the token ids into consecutive windows of ``ctx``
tokens, add no BOS token, score each window on its own from an empty KV cache, and average
the negative log-likelihood of tokens 2..ctx of every window (``ctx - 1`` predictions per
window; the first token of a window has no context and is not scored).

Everything here runs the *compiled* model (``CompiledModel.run`` on its ``main`` function),
so a quantized model is scored from its packed codes exactly as the target computes it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from .generate import forward_logits, positions

ProgressFn = Callable[[int, int], None]


def _session(cm: Any) -> Any:
    """The in-place KV session generate() would decode on (None: the concat path). Scoring through
    it measures what generation computes, e.g. a float16 cache (tvm-llvm ``kv_dtype``); with the
    model's own cache type both paths give the same bits (tests/test_kv_inplace.py)."""
    exe = getattr(cm, "executable", None)
    if exe is None or not getattr(cm, "kv_inplace", True) or not hasattr(exe, "kv_session"):
        return None
    from .generate import has_attention_mask
    return exe.kv_session() if has_attention_mask(cm.module) else None


def window_count(n_tokens: int, ctx: int, windows: int) -> int:
    """How many windows of ``ctx`` tokens are scored: ``windows``, or fewer if the text is short."""
    return min(windows, n_tokens // ctx)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position NLL of ``targets`` [seq] under ``logits`` [seq, vocab], log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    peak = x.max(axis=-1, keepdims=True)
    log_z = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=-1))
    return log_z - x[np.arange(len(targets)), targets]


def _check_arguments(cm: Any, ids: np.ndarray, ctx: int, windows: int) -> None:
    if not getattr(cm, "is_language_model", False):
        raise ValueError("perplexity needs a compiled causal language model")
    if ctx < 2:
        raise ValueError(f"ctx must be >= 2 (a window scores ctx - 1 tokens), got {ctx}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    limit = cm.module.attr("max_positions")
    if isinstance(limit, int) and ctx > limit:
        raise ValueError(f"ctx {ctx} exceeds the model's {limit} positions")
    if len(ids) < ctx:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of ctx={ctx}; "
                         "use a longer text or a smaller ctx")


def perplexity(cm: Any, token_ids: np.ndarray, ctx: int = 1024, windows: int = 16,
               progress: ProgressFn | None = None) -> dict[str, Any]:
    """Perplexity of compiled model ``cm`` on the first ``windows`` windows of ``token_ids``.

    Returns {ppl, nll (mean per scored token, nats), windows (the number scored; fewer than
    asked when the text is short), ctx, tokens_scored, seconds}. ``progress(done, total)`` is
    called with 0 before the first window and after each window. Raises ValueError when the
    text holds fewer than ``ctx`` tokens.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    _check_arguments(cm, ids, ctx, windows)
    n = window_count(len(ids), ctx, windows)
    start = time.perf_counter()
    total_nll, scored = 0.0, 0
    if progress is not None:
        progress(0, n)
    session = _session(cm)
    for w in range(n):
        window = ids[w * ctx:(w + 1) * ctx]
        if session is None:
            logits = forward_logits(cm.run, cm.module, window[None, :])[0]
        else:  # the caches generate() uses (their kv_dtype included), from empty
            session.start(1, ctx)
            logits = session.step(window[None, :], positions(1, 0, ctx), np.ones((1, ctx), np.int64))[0]
        nll = token_nll(logits[:-1], window[1:])
        total_nll += float(nll.sum())
        scored += len(nll)
        if progress is not None:
            progress(w + 1, n)
    mean = total_nll / scored
    return {"ppl": math.exp(mean), "nll": mean, "windows": n, "ctx": ctx, "tokens_scored": scored,
            "seconds": time.perf_counter() - start}
