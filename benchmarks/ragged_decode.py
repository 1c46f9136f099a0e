"""Decode speed and batch invariance of a ragged batch of 4 (DecodeBatch) on a saved artifact.

    python benchmarks/ragged_decode.py DIR [DIR ...] [--lengths 12,40,70,100] [--steps 32] [--threads N]

Per artifact, in this process, greedy decode of 4 prompts of different lengths for ``--steps``
tokens each, four ways:

* ``per-row``: each row on its own batch-1 cache, one ``main`` call per row per token (what
  DecodeBatch does for artifacts without an attention mask; batch-invariant by construction);
* ``concat``: one ``main`` call per token for all 4 rows, caches right-aligned and the padding
  hidden by the attention mask, ``main`` returning ``concat(past, new)`` (every step copies
  every cache: DecodeBatch's path for targets and artifacts without the in-place variant);
* ``in place``: the same layout in buffers with headroom that the kernels write in place
  (DecodeBatch's default where the artifact has the variant, runtime/batch_caches.py);
* ``equal``: in place (where available) with 4 prompts of equal length (the longest), no
  padding: the batch-4 speed without any masking work to do.

Reported: decode tokens/s (all rows' new tokens over the decode steps' wall time; prefill
excluded) and CPU ms per step (process CPU time, all threads, over the steps) of concat and in
place, each the best of ``--repetitions`` runs, the ways interleaved (on a shared machine other
load only ever slows a run down); the ratios; and whether every row's logits equal, bit for bit,
the per-row logits (batch invariance) and the concat path's (in place).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decode(cm, prompts: list[list[int]], steps: int, shared: bool,
           inplace: bool = True) -> tuple[float, float, str, list[list[np.ndarray]]]:
    """(tokens/s, CPU ms per step, DecodeBatch.kv_cache, every row's logits)."""
    from bitsmith.runtime.batching import DecodeBatch
    cm.kv_inplace = inplace
    try:
        db = DecodeBatch(cm)
    finally:
        cm.kv_inplace = True
    db.shared = db.shared and shared  # per-row: the fallback path, one batch-1 cache per row
    logits = [[db.admit(r, p)] for r, p in enumerate(prompts)]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out = db.step({r: int(np.argmax(seq[-1])) for r, seq in enumerate(logits)})
        for r, seq in enumerate(logits):
            seq.append(out[r])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(prompts) * steps / wall, 1e3 * cpu / steps, db.kv_cache, logits


def bit_equal(x: list[list[np.ndarray]], y: list[list[np.ndarray]]) -> str:
    exact = sum(all(np.array_equal(a, b) for a, b in zip(p, q)) for p, q in zip(x, y))
    worst = max(float(np.abs(a - b).max()) for p, q in zip(x, y) for a, b in zip(p, q))
    return f"{exact}/{len(x)} (max diff {worst:.3g})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--lengths", default="12,40,70,100")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="kernel threads (default: the artifact's)")
    args = ap.parse_args(argv)
    import bitsmith
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; prompt lengths {lengths}, "
          f"{args.steps} decode steps per row, best of {args.repetitions}, threads {args.threads or 'default'}\n")
    print("| artifact | target | in-place path | per-row t/s | concat t/s | in place t/s | equal t/s "
          "| concat CPU ms/step | in place CPU ms/step | concat / in place (CPU) | ragged / per-row "
          "| equal / ragged | in place rows bit-equal to concat | ragged rows bit-equal to per-row |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.artifacts:
        cm = bitsmith.load(path, threads=args.threads)
        vocab = int(cm.module.attr("vocab_size"))
        rng = np.random.default_rng(0)
        prompts = [[int(x) for x in rng.integers(0, vocab, n)] for n in lengths]
        equal = [[int(x) for x in rng.integers(0, vocab, max(lengths))] for _ in lengths]
        decode(cm, [p[:4] for p in prompts], 2, True)  # warm-up (first calls load kernels)
        decode(cm, [p[:4] for p in prompts], 2, True, False)
        best = {"per-row": (0.0, np.inf), "concat": (0.0, np.inf), "in place": (0.0, np.inf), "equal": (0.0, np.inf)}
        for _ in range(args.repetitions):
            runs = {"per-row": decode(cm, prompts, args.steps, False),
                    "concat": decode(cm, prompts, args.steps, True, False),
                    "in place": decode(cm, prompts, args.steps, True),
                    "equal": decode(cm, equal, args.steps, True)}
            best = {k: (max(best[k][0], r[0]), min(best[k][1], r[1])) for k, r in runs.items()}
        alone, concat, inplace = runs["per-row"][3], runs["concat"][3], runs["in place"][3]
        (pr, _), (ct, cc), (it, ic), (et, _) = best.values()
        print(f"| {Path(path).name} | {cm.target} | {runs['in place'][2]} | {pr:.2f} | {ct:.2f} | {it:.2f} | "
              f"{et:.2f} | {cc:.1f} | {ic:.1f} | {cc / ic:.2f} | {it / pr:.2f} | {et / it:.2f} | "
              f"{bit_equal(inplace, concat)} | {bit_equal(inplace, alone)} |", flush=True)


if __name__ == "__main__":
    main()
