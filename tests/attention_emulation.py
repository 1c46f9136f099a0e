"""numpy emulation of tvm-cuda's attention kernels (``bitsmith/backends/tvm/attention_cuda.py``).

Written from the algorithm, not from the TIR: the same chunking (chunks of ``split`` keys
counted from the right end of the key axis), the same unified-max rule and fallback
(FlashDecoding++, Hong et al. 2024, §3), the same combine, and for prefill the same
right-aligned key tiles with an online softmax (FlashAttention-2). Everything is float32 as
in the kernels; inputs are taken as given (fp16 inputs are widened exactly). The oracle these
are checked against is the reference interpreter's float64 ``causal_attention``.

The order of the key reductions follows the kernels (keys visited chunk by chunk / tile by
tile, left to right within a tile), which is what the batch-invariance property relies on;
the order of the head-dim dot products is numpy's, which pads never change either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.backends.tvm.attention_cuda import DEFAULT_UNIFIED_MAX, PREFILL_KEYS, SPLIT, UnifiedMax

F32 = np.float32


@dataclass
class SplitStats:
    chunks: int = 0        # (row, head, chunk) blocks that held a visible key
    fallbacks: int = 0     # of those, recomputed with their own max


def _visibility(b: int, s: int, t: int, causal: bool, mask: np.ndarray | None) -> np.ndarray:
    """[b, s, t] bool: key j visible to query row i of batch row bi."""
    vis = np.ones((b, s, t), dtype=bool)
    if causal:
        vis &= (np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s))[None]
    if mask is not None:
        vis &= (np.asarray(mask) != 0)[:, None, :]
    return vis


def _expand_kv(k: np.ndarray, heads: int) -> np.ndarray:
    return np.repeat(k.astype(F32), heads // k.shape[1], axis=1)


def split_kv_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                       mask: np.ndarray | None = None, unified: UnifiedMax = DEFAULT_UNIFIED_MAX,
                       split: int = SPLIT, fallback: bool = True) -> tuple[np.ndarray, SplitStats]:
    """The decode kernel's result (float32 [b, h, s, dv]) and how many chunks fell back.
    ``fallback=False`` drops the fallback rule (every chunk on phi), to show it matters."""
    b, h, s, _ = q.shape
    t = k.shape[2]
    qs = q.astype(F32) * F32(scale)
    kx, vx = _expand_kv(k, h), _expand_kv(v, h)
    vis = _visibility(b, s, t, causal, mask)[:, None]           # [b, 1, s, t]
    phi, low, high = F32(unified.phi), F32(unified.low), F32(unified.high)
    n_chunks = -(-t // split)
    dv = v.shape[3]
    o_part = np.zeros((n_chunks, b, h, s, dv), F32)
    l_part = np.zeros((n_chunks, b, h, s), F32)
    r_part = np.zeros((n_chunks, b, h, s), F32)
    stats = SplitStats()
    for c in range(n_chunks):
        j0 = t - (c + 1) * split
        js = np.arange(max(j0, 0), j0 + split)
        x = np.einsum("bhsd,bhjd->bhsj", qs, kx[:, :, js]).astype(F32)
        x = np.where(vis[..., js], x, F32(-np.inf))
        any_high = (x > phi + high).any(-1)
        any_ok = (x >= phi + low).any(-1)
        any_visible = (x > -np.inf).any(-1)
        need = (any_high | (any_visible & ~any_ok)) if fallback else np.zeros_like(any_high)
        r = np.where(need, x.max(-1, initial=-np.inf), phi).astype(F32)
        with np.errstate(over="ignore", invalid="ignore"):
            p = np.exp(x - r[..., None]).astype(F32)
        l = np.zeros((b, h, s), F32)
        o = np.zeros((b, h, s, dv), F32)
        with np.errstate(over="ignore", invalid="ignore"):  # fallback=False overflows, as it should
            for n in range(len(js)):  # keys left to right (the kernel keeps a few interleaved partial sums)
                pn = p[..., n]
                l += pn
                o += np.where(pn[..., None] > 0, pn[..., None] * vx[:, :, js[n]][:, :, None, :], F32(0))
        o_part[c], l_part[c], r_part[c] = o, l, r
        stats.chunks += int(any_visible.sum())
        stats.fallbacks += int((need & any_visible).sum())
    live = l_part > 0
    big_m = np.where(live, r_part, F32(-np.inf)).max(0)
    with np.errstate(over="ignore", invalid="ignore"):
        f = np.where(r_part == big_m, F32(1), np.exp(r_part - big_m)).astype(F32)
    den = np.zeros((b, h, s), F32)
    num = np.zeros((b, h, s, dv), F32)
    with np.errstate(over="ignore", invalid="ignore"):
        for c in range(n_chunks):  # the combine kernel's fixed order
            den += np.where(live[c], l_part[c] * f[c], F32(0))
            num += np.where(live[c][..., None], o_part[c] * f[c][..., None], F32(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den[..., None] > 0, num / den[..., None], F32(0))
    return out.astype(F32), stats


def tiled_prefill_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                            mask: np.ndarray | None = None, tile: int = PREFILL_KEYS) -> np.ndarray:
    """The prefill kernel's result: key tiles of ``tile`` keys counted from the right end,
    visited left to right; per row a running max m, sum l and accumulator, rescaled by
    exp(m_old - m_new) per tile; a tile with no visible key is skipped."""
    b, h, s, _ = q.shape
    t = k.shape[2]
    qs = q.astype(F32) * F32(scale)
    kx, vx = _expand_kv(k, h), _expand_kv(v, h)
    vis = _visibility(b, s, t, causal, mask)[:, None]
    dv = v.shape[3]
    m = np.full((b, h, s), -np.inf, F32)
    l = np.zeros((b, h, s), F32)
    acc = np.zeros((b, h, s, dv), F32)
    n_tiles = -(-t // tile)
    for kk in range(n_tiles):
        j0 = t - (n_tiles - kk) * tile
        js = np.arange(max(j0, 0), j0 + tile)
        x = np.einsum("bhsd,bhjd->bhsj", qs, kx[:, :, js]).astype(F32)
        x = np.where(vis[..., js], x, F32(-np.inf))
        tmax = x.max(-1)
        live = tmax > -np.inf
        m_new = np.where(live, np.maximum(m, tmax), m)
        with np.errstate(invalid="ignore"):
            alpha = np.where(live & (m > -np.inf), np.exp(m - m_new), F32(0)).astype(F32)
            p = np.where(live[..., None], np.exp(x - m_new[..., None]), F32(0)).astype(F32)
        l = np.where(live, l * alpha, l)
        acc = np.where(live[..., None], acc * alpha[..., None], acc)
        for n in range(len(js)):
            pn = p[..., n]
            l = l + pn
            acc = acc + pn[..., None] * vx[:, :, js[n]][:, :, None, :]
        m = m_new
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l[..., None] > 0, acc / l[..., None], F32(0)).astype(F32)


def measure_errors(trials: int = 60, seed: int = 0) -> dict[str, float]:
    """Worst |emulation - oracle| / max|v| over random fp16 cases (GQA, masks, t up to 400):
    the measurement behind the tolerance of tests/test_attention_cuda.py."""
    from bitsmith.ir.interpreter import causal_attention
    rng = np.random.default_rng(seed)
    worst: dict[str, float] = {}
    for _ in range(trials):
        b, kvh, g, s = (int(x) for x in (rng.integers(1, 3), rng.integers(1, 4), rng.integers(1, 4),
                                          rng.integers(1, 5)))
        t = int(rng.integers(0, 400)) + s
        d = int(rng.choice([8, 16, 64]))
        for q_scale in (1.0, 4.0):
            q = (rng.standard_normal((b, kvh * g, s, d)) * q_scale).astype(np.float16)
            k = rng.standard_normal((b, kvh, t, d)).astype(np.float16)
            v = rng.standard_normal((b, kvh, t, d)).astype(np.float16)
            mask = (rng.random((b, t)) > 0.3).astype(np.int64)
            ref = causal_attention(*(a.astype(np.float64) for a in (q, k, v)), d ** -0.5, True, mask)
            runs = {"split": split_kv_attention(q, k, v, d ** -0.5, True, mask)[0],
                    "split 8": split_kv_attention(q, k, v, d ** -0.5, True, mask, split=8)[0],
                    "split, all fallback": split_kv_attention(q, k, v, d ** -0.5, True, mask,
                                                              UnifiedMax(phi=-100.0))[0],
                    "prefill": tiled_prefill_attention(q, k, v, d ** -0.5, True, mask),
                    "prefill tile 4": tiled_prefill_attention(q, k, v, d ** -0.5, True, mask, tile=4)}
            for name, out in runs.items():
                err = float(np.abs(out - ref).max() / np.abs(v.astype(np.float32)).max())
                worst[name] = max(worst.get(name, 0.0), err)
    return worst


if __name__ == "__main__":  # python tests/attention_emulation.py
    for name, err in measure_errors().items():
        print(f"{name:>20}: worst |emulation - oracle| / max|v| = {err:.2e}")
