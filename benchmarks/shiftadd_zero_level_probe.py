"""Why pow2 BCQ breaks SmolLM2: perplexity of independent power-of-two-step grids (with and
without a level 0, clipping or covering max|w|) beside bitsmith's fits, weights swapped in torch.

    python benchmarks/shiftadd_zero_level_probe.py REGEX VARIANT...   (e.g. 'self_attn' uni-round uni-zero)

Variants: uni-round, uni-ceil, uni-zero, z5, fit0 (pow2 3-bit), ap / apz (apot2 3-bit without /
with zero_level), rtn3. Prints relative weight MSE and perplexity (4 windows x 256 tokens).
Results: benchmarks/results/shiftadd_quality_numpy.md.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pow2_uniform(w: np.ndarray, gs: int = 128, rounding=np.round) -> np.ndarray:
    """Eight levels (m + 1/2)·step, m in -4..3, no level 0: what a 3-plane pow2 code with scales
    (4c, 2c, c) holds; the step a power of two near max|w| / 3.5 (``rounding``: round or ceil)."""
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0 + gs]
        mx = np.abs(b).max(1, keepdims=True)
        step = 2.0 ** rounding(np.log2(np.maximum(mx, 1e-30) / 3.5))
        m = np.clip(np.floor(b / step), -4, 3)
        out[:, g0:g0 + gs] = (m + 0.5) * step
    return out


def pow2_uniform_with_zero(w: np.ndarray, gs: int = 128) -> np.ndarray:
    """Eight levels m·step, m in -4..3 (a level 0; not a ±1 code: the comparison's other side)."""
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0 + gs]
        mx = np.abs(b).max(1, keepdims=True)
        step = 2.0 ** np.round(np.log2(np.maximum(mx, 1e-30) / 3.5))
        out[:, g0:g0 + gs] = np.clip(np.round(b / step), -4, 3) * step
    return out


def five_levels(w: np.ndarray, gs: int = 128) -> np.ndarray:
    """Levels (0, ±step, ±2·step): a 3-plane pow2 code with scales (2c, c, c) that keeps a 0;
    the best of three power-of-two steps per row and group."""
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0 + gs]
        mx = np.abs(b).max(1, keepdims=True)
        best, best_err = None, None
        for off in (-1, 0, 1):
            step = 2.0 ** (np.round(np.log2(np.maximum(mx, 1e-30) / 2)) + off)
            q = np.clip(np.round(b / step), -2, 2) * step
            err = np.sum((b - q) ** 2, 1, keepdims=True)
            if best is None:
                best, best_err = q, err
            else:
                best = np.where(err < best_err, q, best)
                best_err = np.minimum(err, best_err)
        out[:, g0:g0 + gs] = best
    return out


def variants() -> dict:
    from bitsmith.passes.quantization.bcq_fit import fit_bcq
    from shiftadd_quality_numpy import quantize_weight
    return {
        "uni-round": pow2_uniform,
        "uni-ceil": lambda w: pow2_uniform(w, rounding=np.ceil),
        "uni-zero": pow2_uniform_with_zero,
        "z5": five_levels,
        "fit0": lambda w: fit_bcq(w, 3, 128, "pow2", 0).reconstruct(),
        "apz": lambda w: fit_bcq(w, 3, 128, "apot2", 0, zero_level=True).reconstruct(),
        "ap": lambda w: fit_bcq(w, 3, 128, "apot2", 0).reconstruct(),
        "rtn3": lambda w: quantize_weight("rtn-int3", w, None, 0, 0),
    }


def main(argv: list[str]) -> None:
    import torch

    from shiftadd_quality_numpy import TEXT_DIR, linears, load, perplexity, token_ids
    if len(argv) < 2:
        raise SystemExit(__doc__)
    only, names = argv[0], argv[1:]
    table = variants()
    unknown = [v for v in names if v not in table]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(table)}")
    torch.set_num_threads(2)
    model, tok = load()
    layers = linears(model)
    ids = token_ids(tok, TEXT_DIR / "prideprejudice.txt")
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    for v in names:
        t0, err, norm = time.time(), 0.0, 0.0
        for n, m in layers.items():
            w = original[n].numpy().astype(np.float64)
            if re.search(only, n):
                q = table[v](w)
                err += float(np.sum((w - q) ** 2))
                norm += float(np.sum(w ** 2))
            else:
                q = w
            m.weight.data = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        print(v, only, "relMSE", err / max(norm, 1e-30), "ppl", perplexity(model, ids, 256, 4),
              "s", time.time() - t0, flush=True)
        for n, m in layers.items():
            m.weight.data = original[n].clone()


if __name__ == "__main__":
    main(sys.argv[1:])
