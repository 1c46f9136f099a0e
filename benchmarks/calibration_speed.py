"""Calibration statistics time: the original collection vs the runners, same tokens, one process.

SmolLM2-135M, the first N windows of L tokens of sensesensibility.txt (the calibration text of
benchmarks/quality.py). Each runner collects the Hessian statistics of every linear input
(bitsmith.passes.quantization.calibration.collect_statistics); a compiled runner's time
includes its build (kernels come from the on-disk cache after the first run). ``original`` is
the first collection (before runners and probes): the reference interpreter over the whole
model, lm_head and KV outputs included, observing the linear inputs as they are computed.
Wall and CPU seconds (the process's, BLAS threads included) are both reported: on a shared
machine CPU seconds are the steadier figure. Also reports the largest difference of each
runner's Hessians from the original's, relative to each Hessian's largest entry.

    python benchmarks/calibration_speed.py                      # 8 windows of 512: original, numpy-fp32
    python benchmarks/calibration_speed.py --windows 64 --runners numpy-fp32 tvm-llvm reference

Results: benchmarks/results/calibration_speed.md (appended, one block per run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_line  # noqa: E402

# shared/ beside the checkout (a git worktree sits one level deeper than the main checkout)
TEXT_DIR = next((p / "shared" / "data" / "text" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "data" / "text").is_dir()), Path("shared/data/text"))
CALIB_TEXT = TEXT_DIR / "sensesensibility.txt"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--runners", nargs="+", default=["original", "numpy-fp32"],
                   help="original, reference, numpy-fp32 or a target name (calib_target values)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "calibration_speed.md")
    args = p.parse_args()

    import bitsmith
    from bitsmith.backends.calibration import calibration_runner
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.passes.quantization.calibration import TextCalibration, collect_statistics

    t0 = time.perf_counter()
    model, tokenizer = load_pretrained("smollm2-135m")
    module = bitsmith.compile(model, target="reference").module
    load_seconds = time.perf_counter() - t0
    windows = TextCalibration(str(CALIB_TEXT), tokenizer.backend_tokenizer.to_str(), args.windows,
                              args.length).windows()
    load_at_start = open("/proc/loadavg").read().split()[0]
    results = {}
    for name in args.runners:
        t0, c0 = time.perf_counter(), time.process_time()
        stats = (original_collection(module, windows) if name == "original"
                 else collect_statistics(module, windows, progress=True, runner=calibration_runner(name)))
        results[name] = (time.perf_counter() - t0, time.process_time() - c0, stats)
        print(f"{name}: {results[name][0]:.1f}s wall, {results[name][1]:.1f}s cpu", file=sys.stderr, flush=True)

    n = len(windows)
    lines = [f"## {n} windows x {args.length} tokens, SmolLM2-135M (model load and capture {load_seconds:.0f} s, "
             "not counted)", "",
             "| runner | wall s | wall s/window | cpu s | cpu s/window | wall vs original | cpu vs original |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    base = results.get("original") or results.get("reference")
    for name, (wall, cpu, _) in results.items():
        ratios = [f"{base[0] / wall:.2f}x", f"{base[1] / cpu:.2f}x"] if base else ["-", "-"]
        lines.append(f"| {name} | {wall:.1f} | {wall / n:.2f} | {cpu:.1f} | {cpu / n:.2f} | {' | '.join(ratios)} |")
    if base:
        base_name = next(k for k, v in results.items() if v is base)
        for name, (_, _, stats) in results.items():
            if name == base_name:
                continue
            worst = max(float(np.abs(stats[k].hessian - base[2][k].hessian).max() / np.abs(base[2][k].hessian).max())
                        for k in base[2])
            lines.append(f"\nlargest |H_{name} - H_{base_name}| / max|H_{base_name}| over all layers: {worst:.2e}")
    lines += ["", f"Machine: {machine_line()} (shared with other jobs: 1-minute load average {load_at_start} at "
                  f"the start, {open('/proc/loadavg').read().split()[0]} at the end)", "", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(text)
    print(text)


def original_collection(module, windows):
    """The first collection (bitsmith 9ec2fab..6b9a0d5): every window through the reference
    interpreter's whole ``main`` (lm_head and KV outputs included), each linear input's Gram
    added as the node computing it runs."""
    from bitsmith.ir.interpreter import run_function
    from bitsmith.passes.quantization.calibration import GramAccumulator, linear_inputs, main_arguments

    acc = GramAccumulator(linear_inputs(module))

    def observe(node, outputs):
        for value, array in zip(node.outputs, outputs):
            if value.name in acc.sums:
                acc.add(value.name, array)

    for ids in windows:
        run_function(module, "main", main_arguments(module, ids), observe=observe)
    return acc.stats()

if __name__ == "__main__":
    main()
