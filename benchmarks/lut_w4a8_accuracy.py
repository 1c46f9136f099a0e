"""Accuracy cost of int8 activations (``activation_bits=8``, W4A8) on target lut-cpu: SmolLM2-135M.

Three builds of one quantized model (rtn-int4, groups of 128) on lut-cpu, differing only in
how the engine treats activations:

* fp32 tables: float activations, float tables (the "fp path": exact up to float32 rounding);
* int8 tables (the default): float activations, tables rounded to int8 per 32-activation block;
* activation_bits=8: activations rounded to int8 per 32-activation block as llama.cpp's Q8_0
  (d = max|x| / 127, q = round(x / d); llama.cpp ggml-quants.c ``quantize_row_q8_0``, whose
  Q4 x Q8 dot products multiply exactly these integers), exact integer tables.

For each: perplexity on the first ``--windows`` windows of ``--ctx`` tokens of
prideprejudice.txt (bitsmith.runtime.perplexity, the same windows for all three), and the
logit error against the fp32-table build on those windows (max |difference| / max |logit|,
and RMS difference / RMS logit).

    python benchmarks/lut_w4a8_accuracy.py --windows 4 --ctx 256 --markdown benchmarks/results/lut_w4a8_accuracy.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_line  # noqa: E402
from quality import EVAL_TEXT, MODEL  # noqa: E402

VARIANTS = {"fp32 tables": {"lut_tables": "fp32"}, "int8 tables (default)": {},
            "activation_bits=8 (W4A8)": {"activation_bits": 8}}


def eval_windows(tokenizer, count: int, ctx: int) -> list[np.ndarray]:
    """The first ``count`` windows of ``ctx`` token ids of the evaluation text."""
    ids = np.asarray(tokenizer(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"],
                     dtype=np.int64)
    return [ids[w * ctx:(w + 1) * ctx] for w in range(count)]


def main() -> None:
    import bitsmith
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.runtime.generate import forward_logits
    from bitsmith.runtime.perplexity import token_nll

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--quant", default="rtn-int4")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()
    model, tokenizer = load_pretrained(MODEL)
    windows = eval_windows(tokenizer, args.windows, args.ctx)
    logits, rows = {}, []
    for name, extra in VARIANTS.items():
        t0 = time.perf_counter()
        cm = bitsmith.compile(model, target="lut-cpu", quant=args.quant, group_size=128, **extra)
        t1 = time.perf_counter()
        out = [forward_logits(cm.run, cm.module, w[None, :])[0].astype(np.float64) for w in windows]
        nll = np.concatenate([token_nll(o[:-1], w[1:]) for o, w in zip(out, windows)])
        logits[name] = np.stack(out)
        rows.append({"variant": name, "ppl": math.exp(float(nll.mean())), "compile_s": t1 - t0,
                     "eval_s": time.perf_counter() - t1, "executor": cm.report()["executable"]["executor"]})
        print(f"{name}: ppl {rows[-1]['ppl']:.4f} ({rows[-1]['executor']}, compile {t1 - t0:.0f}s)", flush=True)
        del cm
    base = logits["fp32 tables"]
    for r in rows:
        d = logits[r["variant"]] - base
        r["max_err"] = float(np.abs(d).max() / np.abs(base).max())
        r["rms_err"] = float(np.sqrt((d ** 2).mean() / (base ** 2).mean()))
        print(f"{r['variant']}: logit error vs fp32 tables: max {r['max_err']:.2e} of max|logit|, "
              f"rms {r['rms_err']:.2e}")
    if args.markdown:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        lines = ["# int8 activations (W4A8) on lut-cpu: accuracy cost (benchmarks/lut_w4a8_accuracy.py)", "",
                 f"Machine: {machine_line()}; load average at the end {load}. {MODEL}, {args.quant} group 128, "
                 f"first {args.windows} windows of {args.ctx} tokens of {EVAL_TEXT.name}; logit errors against the "
                 "fp32-table build on the same windows.", "",
                 "| activations / tables | perplexity | max logit error / max|logit| | rms logit error / rms logit |",
                 "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['ppl']:.4f} | {r['max_err']:.2e} | {r['rms_err']:.2e} |" for r in rows]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
