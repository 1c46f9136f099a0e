"""Statistics of SmolLM2's softmax inputs, the evidence behind tvm-cuda's unified max phi.

FlashDecoding++ (Hong et al., MLSys 2024, §3) fixes the unified max phi from the distribution
of a model's scaled attention scores x = q·k / sqrt(d). tvm-cuda's decode kernel
(``bitsmith/backends/tvm/attention_cuda.py``) uses phi with a window x - phi in [-60, 60]
per chunk of 128 keys and falls back to the chunk's own max outside it. This script runs
SmolLM2-135M (fp32, torch) over the first N tokens of a text with every attention's scores
recorded (``F.scaled_dot_product_attention`` wrapped), and prints the score percentiles, the
range of chunk maxima, and the fraction of (row, head, chunk) that would fall back for phi
(decode rows: every query row, its visible keys cut into right-aligned chunks of 128).

    python benchmarks/attention_scores.py [--tokens 1024] [--phi 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

TEXT = Path("/work/shared/data/text/prideprejudice.txt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--phi", type=float, default=0.0)
    ap.add_argument("--text", type=Path, default=TEXT)
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    from bitsmith.backends.tvm.attention_cuda import DEFAULT_UNIFIED_MAX, SPLIT
    from bitsmith.frontend.models import load_pretrained
    from machine import machine_line
    model, tok = load_pretrained("smollm2-135m")
    model.config._attn_implementation = "sdpa"
    ids = torch.tensor([tok(args.text.read_text())["input_ids"][: args.tokens]])
    n = ids.shape[1]
    samples, chunk_max, extremes = [], [], []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        g = q.shape[1] // k.shape[1]
        kk = k.repeat_interleave(g, dim=1)
        x = (q.double() @ kk.double().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        x = x[0].numpy()                                        # [h, n, n]; causal: key j <= row i
        vis = np.tril(np.ones((n, n), dtype=bool))
        xv = x[:, vis]
        extremes.append((xv.min(), xv.max()))
        samples.append(xv[:, ::7].astype(np.float32))           # a 1/7 sample for the percentiles
        for i in range(n):                                      # row i decodes over keys 0..i
            t = i + 1
            for c in range(-(-t // SPLIT)):
                lo, hi = max(t - (c + 1) * SPLIT, 0), t - c * SPLIT
                chunk_max.append(x[:, i, lo:hi].max(-1))
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, **kw)

    t0 = time.perf_counter()
    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        F.scaled_dot_product_attention = original
    allx = np.concatenate(samples)
    cm = np.concatenate(chunk_max)
    um = DEFAULT_UNIFIED_MAX
    phi = args.phi
    fall = np.mean((cm - phi > um.high) | (cm - phi < um.low))
    q = [0.0001, 0.01, 0.5, 0.99, 0.9999]
    print(f"machine: {machine_line()}; {time.perf_counter() - t0:.1f} s")
    print(f"SmolLM2-135M fp32, {n} tokens of {args.text.name}, {len(samples)} attention calls, "
          f"{allx.size:,} sampled visible scaled scores, {cm.size:,} (row, head, chunk of {SPLIT}) maxima")
    print("scores  percentiles " + ", ".join(f"{100 * p:g}%: {v:.2f}" for p, v in zip(q, np.quantile(allx, q)))
          + f"; min {min(e[0] for e in extremes):.2f}, max {max(e[1] for e in extremes):.2f}")
    print("chunk max percentiles " + ", ".join(f"{100 * p:g}%: {v:.2f}" for p, v in zip(q, np.quantile(cm, q)))
          + f"; min {cm.min():.2f}, max {cm.max():.2f}")
    print(f"phi {phi:g}, window [{um.low:g}, {um.high:g}]: fallback fraction {fall:.2e} "
          f"(chunks whose max - phi leaves the window)")


if __name__ == "__main__":
    main()
