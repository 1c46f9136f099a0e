"""Length-adaptive compilation on the fpga backend: stored program bytes for max_length 2048 against
one program per length, and the padding overhead in simulated decode cycles.

Writes benchmarks/results/fpga_length_adaptive.md. Run: python benchmarks/fpga_length_adaptive.py

* program size: every bucket of a small Llama shape compiled (16 prefill + 128 decode programs);
  "one program per length" stores, for every prefill length 1..2048 and decode past 1..2047,
  the full stream of its bucket's program (a per-length program has the same instructions,
  other addresses and counts);
* padding overhead: for a decode step at past length L, the cycles of its bucket's program
  (past rounded up to 16, padded rows masked) against a program compiled for exactly L, averaged
  over lengths: every L in 1..2047 for the small shape, and L sampled every 131 for the
  LLaMA2-7B shape (layer-extrapolated as in fpga_llama7b.py).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitsmith.backends.fpga import compile_module  # noqa: E402
from bitsmith.backends.fpga.codegen import lower  # noqa: E402
from bitsmith.backends.fpga.context import build_context  # noqa: E402
from bitsmith.backends.fpga.simulator import simulate_timing  # noqa: E402
from bitsmith.backends.fpga import resolve_preset  # noqa: E402
from bitsmith.ir.length_buckets import Bucket, LengthBuckets  # noqa: E402
from bitsmith.testing.llama_shape import LLAMA2_7B, LlamaShape, llama_shape_module  # noqa: E402

from machine import machine_line  # noqa: E402

OUT = Path(__file__).parent / "results"
SMALL = LlamaShape(hidden=256, heads=4, kv_heads=4, intermediate=688, layers=2, vocab=2048, max_positions=2048)
OPTIONS = {"max_length": 2048, "prefill_step": 128, "kv_step": 16}
PLAN = LengthBuckets(128, 16, 2048)


def cycles_fn(shape: LlamaShape, target: str = "fpga-u280"):
    module = llama_shape_module(shape, scheme="rtn-int4")
    preset = resolve_preset(target, OPTIONS)
    ctx = build_context(module, preset)
    exe = compile_module(module, target, OPTIONS, buckets=[Bucket("decode", 1, 16)])
    fn = module.function("main")
    cache: dict = {}

    def cycles(bucket: Bucket) -> int:
        if bucket not in cache:
            p = lower(ctx, fn, bucket, PLAN.kv_capacity)
            cache[bucket] = simulate_timing(p.instrs, exe.info(p), preset).cycles
        return cache[bucket]
    return cycles


def overhead(cycles, lengths) -> float:
    ratios = [cycles(PLAN.bucket(1, L)) / cycles(Bucket("decode", 1, L)) - 1 for L in lengths]
    return sum(ratios) / len(ratios)


def main() -> None:
    t0 = time.perf_counter()
    lines = ["# Length-adaptive compilation (fpga backend)", "", f"Machine: {machine_line()}", ""]
    exe = compile_module(llama_shape_module(SMALL, scheme="rtn-int4"), "fpga-u280", OPTIONS)
    s = exe.doc["stats"]
    lines += ["## Program storage, max_length 2048 (prefill_step 128, kv_step 16)", "",
              f"Model: Llama shape hidden {SMALL.hidden}, {SMALL.layers} layers, vocab {SMALL.vocab}, rtn-int4.", "",
              "| | programs | bytes |", "|---|---|---|",
              f"| one program per length | {s['per_length_programs']} | {s['per_length_bytes']:,} |",
              f"| buckets (templates + patches) | {s['programs']} ({s['templates']} templates) | {s['stored_bytes']:,} |",
              f"| ratio | | {s['ratio']}x |", ""]
    print(lines[-3:], flush=True)
    small = cycles_fn(SMALL)
    ov_small = overhead(small, range(1, 2048))
    lines += ["## Padding overhead in simulated decode cycles", "",
              "| model | lengths | mean overhead | max overhead |", "|---|---|---|---|"]
    worst = max(small(PLAN.bucket(1, L)) / small(Bucket("decode", 1, L)) - 1 for L in range(1, 2048))
    lines.append(f"| small shape (above) | every past 1..2047 | {ov_small * 100:.2f}% | {worst * 100:.2f}% |")
    print(lines[-1], flush=True)
    big2 = cycles_fn(dataclasses.replace(LLAMA2_7B, layers=2))
    big4 = cycles_fn(dataclasses.replace(LLAMA2_7B, layers=4))

    def big(bucket: Bucket) -> float:
        return big2(bucket) + (big4(bucket) - big2(bucket)) * 15
    sample = range(1, 2048, 131)
    ov_big = overhead(big, sample)
    worst_big = max(big(PLAN.bucket(1, L)) / big(Bucket("decode", 1, L)) - 1 for L in sample)
    lines.append(f"| LLaMA2-7B shape (32 layers, extrapolated) | past 1, 132, ..., 1966 | {ov_big * 100:.2f}% | "
                 f"{worst_big * 100:.2f}% |")
    lines += ["", f"Total time {time.perf_counter() - t0:.0f} s."]
    (OUT / "fpga_length_adaptive.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
