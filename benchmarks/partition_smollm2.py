"""Partition of SmolLM2-135M's decode-capable ``main`` into attention vs the rest.

    python benchmarks/partition_smollm2.py [--past 0 128 1024 8191] [--artifact DIR]

Captures SmolLM2-135M for the reference target (or loads a saved reference artifact with
``--artifact``), runs ``partition`` two ways (``trait=attention``: each attention op alone;
``pattern=attention_kv``: each attention with the KV-cache appends that feed it, the split an
attention device would own) and prints, for each: the sub-function count, the time of the pass,
the bytes crossing the cut per decode token (batch 1, seq 1, past length N; per layer and
total; all values, and only those exchanged with the rest of ``main``, i.e. without the cache
arrays that enter as ``main``'s parameters and leave as its results), and whether the logits
and the new cache equal the unpartitioned module's bit for bit on the reference interpreter for
a prefill and a decode step. Results: benchmarks/results/partition_smollm2.txt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_line  # noqa: E402

SPECS = (("trait=attention", "partition{trait=attention,device=attention}"),
         ("pattern=attention_kv", "partition{pattern=attention_kv,device=attention}"))
PROMPT = "The capital of France is"


def prefill_and_decode(module, ids: np.ndarray) -> list[list[np.ndarray]]:
    """Outputs (logits and new cache) of a prefill of ``ids`` and of one greedy decode step."""
    from bitsmith.ir import run_function
    from bitsmith.runtime.generate import empty_cache, main_args, positions

    n = ids.shape[1]
    prefill = run_function(module, "main", main_args(module, ids, positions(1, 0, n), empty_cache(module, 1)))
    token = prefill[0][:, -1:].argmax(-1).astype(np.int64)
    decode = run_function(module, "main", main_args(module, token, positions(1, n, 1), prefill[1:]))
    return [prefill, decode]


def bitwise_equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
                                    for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--past", type=int, nargs="+", default=[0, 128, 1024, 8191],
                        help="past lengths (tokens in the KV cache) of the decode token")
    parser.add_argument("--artifact", help="a saved reference-target artifact of smollm2-135m")
    args = parser.parse_args()

    import bitsmith
    from bitsmith.passes import PassManager
    from bitsmith.passes.cut_report import cut_report

    t0 = time.perf_counter()
    cm = bitsmith.load(args.artifact) if args.artifact else bitsmith.compile("smollm2-135m", target="reference")
    module = cm.module
    print(f"# partition of SmolLM2-135M main ({len(module.function('main').nodes)} nodes), "
          f"{'loaded' if args.artifact else 'captured'} in {time.perf_counter() - t0:.0f} s")
    print(f"# machine: {machine_line()}")
    ids = np.array([cm.tokenizer().encode(PROMPT, add_special_tokens=False).ids], dtype=np.int64)
    baseline = prefill_and_decode(module, ids)

    for label, spec in SPECS:
        t = time.perf_counter()
        part = PassManager(spec).run(module)
        seconds = time.perf_counter() - t
        report = cut_report(part)
        callees = [f for f in part.functions if f.attr("partition")]
        distinct = {tuple((n.op, n.attrs, tuple(o.type for o in n.outputs)) for n in f.nodes) for f in callees}
        print(f"\n## {spec}")
        print(f"sub-functions: {len(callees)} ({len(distinct)} distinct bodies), calls: {len(report.calls)}, "
              f"ops per sub-function: {sorted({len(f.nodes) for f in callees})}, pass time {seconds:.2f} s "
              f"(verification excluded)")
        print(f"cut per call (callee attributes): in {callees[0].attr('cut_in_bytes')} bytes, "
              f"out {callees[0].attr('cut_out_bytes')} bytes")
        print("\nbytes crossing the cut per decode token (batch 1, seq 1):")
        print("| past | per layer: all | per layer: exchanged | total: all | total: exchanged |")
        print("|---|---|---|---|---|")
        for past in args.past:
            b = {"batch": 1, "seq": 1, "past": past}
            per_all = sorted({c.nbytes(b) for c in report.calls})
            per_ex = sorted({c.nbytes(b, exchanged_only=True) for c in report.calls})
            print(f"| {past} | {'/'.join(map(str, per_all))} | {'/'.join(map(str, per_ex))} "
                  f"| {report.nbytes(b)} | {report.nbytes(b, exchanged_only=True)} |")
        b = {"batch": 1, "seq": 1, "past": args.past[-1]}
        print(f"\nper layer at past {args.past[-1]} (in / out bytes, exchanged in / out):")
        for c in report.calls:
            print(f"  {c.callee:28s} {c.loc.module_path if c.loc else '':28s} generation {c.generation:5d}  "
                  f"{c.bytes_in(b):9d} / {c.bytes_out(b):9d}   {c.bytes_in(b, True):6d} / {c.bytes_out(b, True):6d}")
        got = prefill_and_decode(part, ids)
        for step, want, have in zip(("prefill", "decode"), baseline, got):
            same = bitwise_equal(want, have)
            print(f"{step} ({ids.shape[1] if step == 'prefill' else 1} tokens): logits and cache "
                  f"{'bitwise identical' if same else 'DIFFER'} to the unpartitioned module "
                  f"(max |logit diff| {np.abs(want[0] - have[0]).max():.3g})")
            if not same:
                raise SystemExit(f"{label}: {step} results differ")


if __name__ == "__main__":
    main()
