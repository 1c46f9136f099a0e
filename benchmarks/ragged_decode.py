"""Decode speed and batch invariance of a ragged batch of 4 (DecodeBatch) on a saved artifact.

    python benchmarks/ragged_decode.py DIR [DIR ...] [--lengths 12,40,70,100] [--steps 32]

Per artifact, in this process, greedy decode of 4 prompts of different lengths for ``--steps``
tokens each, three ways:

* ``per-row``: each row on its own batch-1 cache, one ``main`` call per row per token (what
  DecodeBatch does for artifacts without an attention mask; batch-invariant by construction);
* ``shared ragged``: one ``main`` call per token for all 4 rows, caches right-aligned and the
  padding hidden by the attention mask (DecodeBatch's shared layout);
* ``shared equal``: the same with 4 prompts of equal length (the longest), no padding: the
  batch-4 speed without any masking work to do.

Reported: decode tokens/s (all rows' new tokens over the decode steps' time; prefill
excluded; the best of ``--repetitions`` runs, the three ways interleaved, since on a shared
machine other load only ever slows a run down), the ratios, and whether every row's logits in the shared ragged batch
equal, bit for bit, the same row's per-row logits at every step (batch invariance).
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


def decode(cm, prompts: list[list[int]], steps: int, shared: bool) -> tuple[float, list[list[np.ndarray]]]:
    from bitsmith.runtime.batching import DecodeBatch
    db = DecodeBatch(cm)
    db.shared = db.shared and shared  # per-row: the fallback path, one batch-1 cache per row
    logits = [[db.admit(r, p)] for r, p in enumerate(prompts)]
    t0 = time.perf_counter()
    for _ in range(steps):
        out = db.step({r: int(np.argmax(seq[-1])) for r, seq in enumerate(logits)})
        for r, seq in enumerate(logits):
            seq.append(out[r])
    return len(prompts) * steps / (time.perf_counter() - t0), logits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--lengths", default="12,40,70,100")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args(argv)
    import bitsmith
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; prompt lengths {lengths}, "
          f"{args.steps} decode steps per row, best of {args.repetitions}\n")
    print("| artifact | target | per-row t/s | shared ragged t/s | shared equal t/s | ragged / per-row "
          "| equal / ragged | ragged rows bit-equal to per-row |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.artifacts:
        cm = bitsmith.load(path)
        vocab = int(cm.module.attr("vocab_size"))
        rng = np.random.default_rng(0)
        prompts = [[int(x) for x in rng.integers(0, vocab, n)] for n in lengths]
        equal = [[int(x) for x in rng.integers(0, vocab, max(lengths))] for _ in lengths]
        decode(cm, [p[:4] for p in prompts], 2, True)  # warm-up (first calls load kernels)
        per_row = ragged = same = 0.0
        for _ in range(args.repetitions):
            speed, alone = decode(cm, prompts, args.steps, False)
            per_row = max(per_row, speed)
            speed, together = decode(cm, prompts, args.steps, True)
            ragged = max(ragged, speed)
            same = max(same, decode(cm, equal, args.steps, True)[0])
        exact = sum(all(np.array_equal(a, b) for a, b in zip(x, y)) for x, y in zip(alone, together))
        worst = max(float(np.abs(a - b).max()) for x, y in zip(alone, together) for a, b in zip(x, y))
        print(f"| {Path(path).name} | {cm.target} | {per_row:.2f} | {ragged:.2f} | {same:.2f} | "
              f"{ragged / per_row:.2f} | {same / ragged:.2f} | {exact}/{len(prompts)} (max diff {worst:.3g}) |",
              flush=True)


if __name__ == "__main__":
    main()
