"""How far each fp32 result of SmolLM2-135M is from a float64 torch run of the same model.

    python benchmarks/oracle_accuracy.py [--no-tvm]

Baseline: the transformers model cast to float64 (``model.double()``) on one fixed English
prompt; its logits stand for the exact ones. Rows: torch fp32 (the same model, fp32), the
reference target (bitsmith's oracle, float64 accumulation, one rounding per op) and tvm-llvm
(fp32 kernels). Columns: max |logit - float64 logit| over every position and vocabulary entry,
that error relative to torch fp32's, and max |error| / max(|float64 logit|, 1) per element.
The oracle must carry less error than what it judges: its ratio to torch fp32 must be < 1.
Environment variables such as OPENBLAS_CORETYPE / ATEN_CPU_CAPABILITY are printed with the
machine line, so runs under an instruction-set emulation are told apart.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_line  # noqa: E402

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife. However little known the feelings or views of such a man may be")
ISA_VARIABLES = ("OPENBLAS_CORETYPE", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _errors(got: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    diff = np.abs(got.astype(np.float64) - exact)
    return float(diff.max()), float((diff / np.maximum(np.abs(exact), 1.0)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tvm", action="store_true", help="skip the tvm-llvm rows (~1 min each to compile)")
    parser.add_argument("--tvm-mcpu", default="host",
                        help="comma-separated mcpu values, one tvm-llvm row each (e.g. host,x86-64-v3: "
                             "AVX2 kernels sum in another order, as on an AVX2-only CPU)")
    args = parser.parse_args()

    import bitsmith
    from bitsmith.frontend.models import load_pretrained

    model, tok = load_pretrained("smollm2-135m")
    ids = torch.tensor([tok.encode(PROMPT, add_special_tokens=False)])
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(input_ids=ids).logits.numpy()
        rows = {"torch fp32": model(input_ids=ids).logits.numpy()}
    builds = {"reference": ("reference", {})}
    for mcpu in ([] if args.no_tvm else args.tvm_mcpu.split(",")):
        name = "tvm-llvm" if mcpu == "host" else f"tvm-llvm mcpu={mcpu}"
        builds[name] = ("tvm-llvm", {} if mcpu == "host" else {"mcpu": mcpu})
    seconds = {}
    for name, (target, options) in builds.items():
        start = time.perf_counter()
        cm = bitsmith.compile(model, target=target, **options)
        seconds[name] = time.perf_counter() - start
        rows[name] = cm(ids).numpy()

    isa = ", ".join(f"{k}={os.environ[k]}" for k in ISA_VARIABLES if k in os.environ) or "native"
    print(f"machine: {machine_line()}; torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; ISA variables: {isa}")
    print(f"SmolLM2-135M, {ids.shape[1]} prompt tokens, logits [{exact.shape[1]} x {exact.shape[2]}], "
          f"max |float64 logit| {np.abs(exact).max():.2f}")
    print()
    baseline = _errors(rows["torch fp32"], exact)[0]
    print("| result | max abs error vs float64 | ratio to torch fp32 | max rel error | argmax = float64's |")
    print("|---|---|---|---|---|")
    for name, got in rows.items():
        abs_err, rel_err = _errors(got, exact)
        same = bool((got.argmax(-1) == exact.argmax(-1)).all())
        print(f"| {name} | {abs_err:.3e} | {abs_err / baseline:.2f} | {rel_err:.3e} | {same} |")
    print()
    print("compile seconds: " + ", ".join(f"{t} {s:.1f}" for t, s in seconds.items()))


if __name__ == "__main__":
    main()
