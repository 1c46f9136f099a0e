"""Next-token choice from logits: greedy, or sampling with the usual logits processors.

Order, applied to each row's last-position logits (float64, so the filters do not depend on
float32 rounding): repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample.

* repetition penalty ``r`` (CTRL's rule, as transformers): for every token id already in the
  row (prompt and generated), a positive logit is divided by ``r``, a negative one multiplied.
* temperature ``t``: logits / t.
* top-k: keeps the ``k`` largest logits (ties at the k-th value are all kept).
* top-p (nucleus): keeps the smallest set of most probable tokens whose probability sums to at
  least ``p`` (always at least the most probable token).
* min-p: keeps tokens whose probability is at least ``min_p`` times the largest probability.
* sample: one draw from the softmax of what is kept, by inverse CDF on ``Generator.random()``.

Reproducibility: a call's draws come from ``numpy.random.Generator(PCG64(seed))`` created once
per ``generate`` call, one ``random()`` draw per row per step, so a seed gives the same tokens
for the same prompt on the same target (logits that differ across targets may change them).
Greedy decoding (``do_sample=False``) ignores every sampling field but the repetition penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    """transformers' ``generate`` names and defaults (greedy unless ``do_sample``; top_k 50)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50   # transformers' default; None or 0: off
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a positive finite number, got {self.repetition_penalty}")
        if self.do_sample:  # greedy ignores the sampling fields, as transformers does
            self._check_sampling()

    def _check_sampling(self) -> None:
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {self.temperature} "
                             "(for greedy decoding leave do_sample False)")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer or None (0: off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")

    def generator(self) -> np.random.Generator:
        """A fresh PCG64 stream for one ``generate`` call (OS entropy when ``seed`` is None)."""
        return np.random.Generator(np.random.PCG64(self.seed))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """``logits`` [batch, vocab] with every id in ``seen`` [batch, n] penalized (CTRL's rule)."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for row, ids in enumerate(seen):
        ids = np.unique(ids[(ids >= 0) & (ids < out.shape[1])])
        v = out[row, ids]
        out[row, ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def scaled_logits(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` after subtracting each row's largest finite logit, so that a
    tiny temperature cannot overflow to inf (and NaN probabilities); a row holding +inf keeps
    only its +inf tokens (the limit of the softmax)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = np.isposinf(logits)
    logits = np.where(top.any(axis=1, keepdims=True), np.where(top, 0.0, -np.inf), logits)
    m = np.max(logits, axis=1, keepdims=True)
    with np.errstate(over="ignore"):  # a tiny temperature sends the non-maximal logits to -inf
        return (logits - np.where(np.isfinite(m), m, 0.0)) / temperature


def allowed_mask(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """[batch, vocab] booleans: the tokens that top-k, top-p and min-p leave (after temperature)."""
    z = scaled_logits(logits, config.temperature)
    keep = np.isfinite(z) | (z == np.inf)
    if config.top_k:
        k = min(int(config.top_k), z.shape[1])
        kth = np.partition(z, -k, axis=1)[:, -k][:, None]
        keep &= z >= kth
    if config.top_p < 1.0 or config.min_p:
        probs = softmax(np.where(keep, z, -np.inf))
        if config.top_p < 1.0:
            order = np.argsort(-probs, axis=1, kind="stable")
            sorted_p = np.take_along_axis(probs, order, axis=1)
            before = np.cumsum(sorted_p, axis=1) - sorted_p  # mass of the more probable tokens
            in_nucleus = before < config.top_p
            in_nucleus[:, 0] = True
            nucleus = np.zeros_like(keep)
            np.put_along_axis(nucleus, order, in_nucleus, axis=1)
            keep &= nucleus
        if config.min_p:
            keep &= probs >= config.min_p * probs.max(axis=1, keepdims=True)
    return keep


def softmax(z: np.ndarray) -> np.ndarray:
    m = np.max(z, axis=1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(m), m, 0.0))
    return e / e.sum(axis=1, keepdims=True)


def sampling_probs(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution a sampled token is drawn from: softmax over the allowed tokens."""
    z = scaled_logits(logits, config.temperature)
    return softmax(np.where(allowed_mask(logits, config), z, -np.inf))


def next_tokens(logits: np.ndarray, seen: np.ndarray, config: SamplingConfig,
                rng: np.random.Generator) -> np.ndarray:
    """The next token of each row from last-position ``logits`` [batch, vocab]."""
    z = apply_repetition_penalty(np.asarray(logits, dtype=np.float64), seen, config.repetition_penalty)
    if not config.do_sample:
        return z.argmax(axis=1).astype(np.int64)
    probs = sampling_probs(z, config)
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]
    picked = (cdf <= u).sum(axis=1)
    # a u at the top end (rounding) could step past the last allowed token: clamp to it
    last_allowed = probs.shape[1] - 1 - np.argmax(probs[:, ::-1] > 0, axis=1)
    return np.minimum(picked, last_allowed).astype(np.int64)
