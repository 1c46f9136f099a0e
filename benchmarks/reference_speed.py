"""Speed of the reference target (the oracle) on SmolLM2-135M: prefill and per-token decode.

    python benchmarks/reference_speed.py --text /work/shared/data/text/prideprejudice.txt [--repeats 3] [--decode 8]

Prefill: one forward of a 64-token prompt (taken from --text, an English text) from an
empty KV cache; decode: greedy single-token steps after it. Prints min and median over the
repetitions and the machine line. Run it with the environment's thread settings made explicit
(e.g. OPENBLAS_NUM_THREADS=1) when the machine is shared: multi-threaded BLAS on busy cores is
erratic. Used for the cost table in benchmarks/results/oracle_accuracy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", type=int, default=8, help="decode steps per repetition")
    parser.add_argument("--text", required=True, help="a text of at least 9000 characters")
    args = parser.parse_args()

    import bitsmith
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.runtime.generate import empty_cache, positions

    model, tok = load_pretrained("smollm2-135m")
    cm = bitsmith.compile(model, target="reference")
    text = Path(args.text).read_text()[5000:9000]
    ids = np.array([tok.encode(text, add_special_tokens=False)[:64]])
    prefill, decode = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        logits, *cache = cm.run("main", [ids, positions(1, 0, ids.shape[1]), *empty_cache(cm.module, 1)])
        prefill.append(time.perf_counter() - start)
        token = logits[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        for i in range(args.decode):
            logits, *cache = cm.run("main", [token, positions(1, ids.shape[1] + i, 1), *cache])
            token = logits[:, -1].argmax(-1)[:, None]
        decode.append((time.perf_counter() - start) / args.decode)
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"machine: {machine_line()}; OPENBLAS_NUM_THREADS={threads}")
    print(f"prefill {ids.shape[1]} tokens: min {min(prefill):.3f} s, median {np.median(prefill):.3f} s")
    print(f"decode per token: min {min(decode):.4f} s, median {np.median(decode):.4f} s")


if __name__ == "__main__":
    main()
