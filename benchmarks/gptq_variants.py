"""GPTQ variants on real SmolLM2-135M layers: held-out output error of act-order and dampening.

A cheap proxy for the perplexity table (which needs a forward pass per variant): the Hessians
of a few layers' inputs are collected on the first 2N windows of 512 tokens of the
calibration text (benchmarks/quality.py's); GPTQ runs on the Hessian of the first N windows,
and its output error ``tr((W-Q) H (W-Q)ᵀ) / tr(W H Wᵀ)`` is measured on the Hessian of the other
N (held out). Round-to-nearest is the baseline.

    python benchmarks/gptq_variants.py                  # 4 + 4 windows, bitmod-w3 and rtn-int3
    python benchmarks/gptq_variants.py --schemes bitmod-w4 --windows 8

Results: benchmarks/results/gptq_variants.md (appended).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from calibration_speed import CALIB_TEXT  # noqa: E402
from machine import machine_line  # noqa: E402

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.15.self_attn.o_proj",
          "model.layers.15.mlp.gate_proj", "model.layers.29.self_attn.k_proj", "model.layers.29.mlp.down_proj")
VARIANTS = (("rtn", None), ("gptq damp=0.01", (0.01, False)), ("gptq damp=0.1", (0.1, False)),
            ("gptq damp=0.001", (0.001, False)), ("act_order damp=0.01", (0.01, True)),
            ("act_order damp=0.1", (0.1, True)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4, help="calibration windows (as many again held out)")
    p.add_argument("--schemes", nargs="+", default=["bitmod-w3", "rtn-int3"])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gptq_variants.md")
    args = p.parse_args()

    import bitsmith
    from bitsmith.backends.calibration import calibration_runner
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.ir.quant_grids import get_scheme
    from bitsmith.passes.quantization import dequantize_matrix, quantize_matrix
    from bitsmith.passes.quantization.calibration import TextCalibration, collect_statistics
    from bitsmith.passes.quantization.gptq import gptq_quantize_matrix

    model, tokenizer = load_pretrained("smollm2-135m")
    module = bitsmith.compile(model, target="reference").module
    windows = TextCalibration(str(CALIB_TEXT), tokenizer.backend_tokenizer.to_str(), 2 * args.windows,
                              512).windows()
    runner = calibration_runner("auto")
    fit = collect_statistics(module, windows[:args.windows], progress=True, runner=runner)
    held = collect_statistics(module, windows[args.windows:], progress=True, runner=runner)
    fn = module.function("main")
    producers = fn.producers()
    sites = {n.loc.module_path: n for n in fn.nodes if n.op == "linear" and n.loc}

    lines = [f"## SmolLM2-135M, GPTQ on {args.windows} windows of 512, error on {len(windows) - args.windows} "
             f"held-out windows, groups of {args.group_size}", "",
             "Relative output error tr((W-Q)H(W-Q)ᵀ)/tr(WHWᵀ) on the held-out Hessian, ×1e3 (lower is better).", "",
             "| scheme | variant | " + " | ".join(l.replace("model.layers.", "L") for l in LAYERS) + " | mean |",
             "|---|---|" + "---:|" * (len(LAYERS) + 1)]
    for scheme_name in args.schemes:
        scheme = get_scheme(scheme_name)
        for label, variant in VARIANTS:
            errs = []
            for path in LAYERS:
                node = sites[path]
                w = module.tensors[producers[node.inputs[1]].attr("name")].astype(np.float32)
                if variant is None:
                    qm = quantize_matrix(w, scheme, args.group_size)
                else:
                    qm = gptq_quantize_matrix(w, fit[node.inputs[0]].hessian, scheme, args.group_size,
                                              damp=variant[0], act_order=variant[1])
                d = w.astype(np.float64) - dequantize_matrix(qm, scheme, args.group_size)
                h = held[node.inputs[0]].hessian
                errs.append(float(np.einsum("ik,kl,il->", d, h, d) / np.einsum("ik,kl,il->", w, h, w)))
            lines.append(f"| {scheme_name} | {label} | " + " | ".join(f"{1e3 * e:.3f}" for e in errs)
                         + f" | {1e3 * float(np.mean(errs)):.3f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Runner: {runner.name}. Machine: {machine_line()}; {time.strftime('%Y-%m-%d')}", "", ""]
    text = "\n".join(lines)
    with args.out.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
