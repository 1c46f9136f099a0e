"""Calibration statistics time: the reference interpreter vs a compiled CPU target, same tokens.

SmolLM2-135M, the first N windows of L tokens of sensesensibility.txt (the calibration text of
benchmarks/quality.py). Each runner collects the Hessian statistics of every linear input
(bitsmith.passes.quantization.calibration.collect_statistics); a compiled runner's time
includes its build (kernels come from the on-disk cache after the first run). Also reports the
largest difference of the two runners' Hessians relative to each Hessian's largest entry.

    python benchmarks/calibration_speed.py                      # 8 windows of 512, both runners
    python benchmarks/calibration_speed.py --windows 64 --runners tvm-llvm

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
    p.add_argument("--runners", nargs="+", default=["reference", "tvm-llvm"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "calibration_speed.md")
    args = p.parse_args()

    import bitsmith
    from bitsmith.backends.calibration import calibration_runner
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.passes.quantization.calibration import TextCalibration, collect_statistics

    model, tokenizer = load_pretrained("smollm2-135m")
    module = bitsmith.compile(model, target="reference").module
    windows = TextCalibration(str(CALIB_TEXT), tokenizer.backend_tokenizer.to_str(), args.windows,
                              args.length).windows()
    results = {}
    for name in args.runners:
        t0 = time.perf_counter()
        stats = collect_statistics(module, windows, progress=True, runner=calibration_runner(name))
        results[name] = (time.perf_counter() - t0, stats)
        print(f"{name}: {results[name][0]:.1f}s", file=sys.stderr, flush=True)

    lines = [f"## {len(windows)} windows x {args.length} tokens, SmolLM2-135M", "",
             "| runner | seconds | s/window | vs reference |", "|---|---:|---:|---:|"]
    ref = results.get("reference")
    for name, (seconds, _) in results.items():
        ratio = f"{ref[0] / seconds:.2f}x" if ref else "-"
        lines.append(f"| {name} | {seconds:.1f} | {seconds / len(windows):.2f} | {ratio} |")
    if ref:
        for name, (_, stats) in results.items():
            if name == "reference":
                continue
            worst = max(float(np.abs(stats[k].hessian - ref[1][k].hessian).max() / np.abs(ref[1][k].hessian).max())
                        for k in ref[1])
            lines.append(f"\nlargest |H_{name} - H_reference| / max|H_reference| over all layers: {worst:.2e}")
    lines += ["", f"Machine: {machine_line()} (shared with other jobs: 1-minute load average at the end "
                  f"{open('/proc/loadavg').read().split()[0]})", "", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
