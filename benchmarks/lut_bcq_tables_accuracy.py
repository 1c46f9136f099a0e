"""What int8 activation tables cost on lut-cpu for binary-coded (shiftadd) layers: SmolLM2-135M.

For each quantization (shiftadd-w3 with and without the per-group offset, and the qlinear
schemes rtn-int3, bitmod-w3, rtn-int4 as the baseline of what int8 tables cost on this model),
one quantized module is built for lut-cpu twice, differing only in ``lut_tables``:

* fp32 tables: equal to the reference target under the same quantization up to float32
  summation order (tests/test_lut_bcq_smollm2.py, tests/test_lut_smollm2.py);
* int8 tables (the default): each table block of 32 activations rounded to int8 (docs/lut-isa.md
  section 1), the only difference.

Per build: perplexity on the first ``--windows`` windows of ``--ctx`` tokens of
prideprejudice.txt (bitsmith.runtime.perplexity.token_nll, the same windows for all), the logit
error of int8 against fp32 tables on those windows (max |difference| / max |logit|, RMS
difference / RMS logit), and greedy decoding of 32 tokens after the first 8 tokens of
tests/test_lut_smollm2.py's text: how many of the 32 equal the fp32-table tokens.

The shiftadd fits take CPU minutes each; ``--cache DIR`` saves each fitted lut-cpu build as an
artifact there and loads it on the next run (the fit is deterministic).

    python benchmarks/lut_bcq_tables_accuracy.py --cache /tmp/bcq-cache \\
        --markdown benchmarks/results/lut_bcq_tables_accuracy.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_line  # noqa: E402
from lut_w4a8_accuracy import eval_windows  # noqa: E402
from quality import EVAL_TEXT, MODEL  # noqa: E402

PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a wife.")
# (label, compile options); shiftadd with 2 refinement rounds, as the slow test fits it
QUANTS = {"shiftadd-w3-offset": dict(quant="shiftadd-w3", shiftadd_offset=True, shiftadd_iterations=2),
          "shiftadd-w3": dict(quant="shiftadd-w3", shiftadd_iterations=2),
          "rtn-int3": dict(quant="rtn-int3"), "bitmod-w3": dict(quant="bitmod-w3"), "rtn-int4": dict(quant="rtn-int4")}


def fitted(model, tokenizer, label: str, options: dict, cache: Path | None):
    """The lut-cpu (int8 tables) build of ``label``: from the cache when there, else compiled."""
    import bitsmith
    where = cache / label if cache else None
    if where is not None and where.exists():
        return bitsmith.load(str(where), trust_native_code=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shiftadd's "experimental" warning, already documented
        cm = bitsmith.compile(model, target="lut-cpu", tokenizer=tokenizer, **options)
    if where is not None:
        cm.save(str(where))
    return cm


def with_tables(cm, tables: str):
    """``cm``'s module built again for lut-cpu with ``lut_tables=tables`` (no refit)."""
    from bitsmith.backends import backend_for_target
    backend = backend_for_target("lut-cpu")
    options = {**backend.option_defaults("lut-cpu"), "lut_tables": tables}
    return dataclasses.replace(cm, executable=backend.build(cm.module, "lut-cpu", options), options=options)


def measure(cm, windows: list[np.ndarray], prompt: np.ndarray) -> dict:
    from bitsmith.runtime.generate import forward_logits
    from bitsmith.runtime.perplexity import token_nll
    logits = [forward_logits(cm.run, cm.module, w[None, :])[0].astype(np.float64) for w in windows]
    nll = np.concatenate([token_nll(o[:-1], w[1:]) for o, w in zip(logits, windows)])
    tokens = np.asarray(cm.generate(prompt[None, :], max_new_tokens=32))[0, len(prompt):]
    return {"ppl": math.exp(float(nll.mean())), "logits": np.stack(logits), "tokens": tokens}


def main() -> None:
    from bitsmith.frontend.models import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--quant", action="append", choices=list(QUANTS), help="rows to run (default: all)")
    ap.add_argument("--cache", type=Path, help="folder for the fitted builds (saved artifacts)")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args()
    model, tokenizer = load_pretrained(MODEL)
    windows = eval_windows(tokenizer, args.windows, args.ctx)
    prompt = np.asarray(tokenizer(PROMPT, add_special_tokens=False)["input_ids"][:8], dtype=np.int64)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for label in args.quant or list(QUANTS):
        t0 = time.process_time()
        cm = fitted(model, tokenizer, label, QUANTS[label], args.cache)
        got = {tables: measure(with_tables(cm, tables), windows, prompt) for tables in ("fp32", "int8")}
        d = got["int8"]["logits"] - got["fp32"]["logits"]
        base = got["fp32"]["logits"]
        rows.append({"label": label, "ppl_fp32": got["fp32"]["ppl"], "ppl_int8": got["int8"]["ppl"],
                     "max_err": float(np.abs(d).max() / np.abs(base).max()),
                     "rms_err": float(np.sqrt((d ** 2).mean() / (base ** 2).mean())),
                     "greedy": int((got["int8"]["tokens"] == got["fp32"]["tokens"]).sum()),
                     "argmax": float((got["int8"]["logits"].argmax(-1) == base.argmax(-1)).mean()),
                     "cpu_s": time.process_time() - t0})
        r = rows[-1]
        print(f"{label}: ppl fp32 {r['ppl_fp32']:.3f} int8 {r['ppl_int8']:.3f} ({r['ppl_int8'] / r['ppl_fp32'] - 1:+.1%}); "
              f"int8 vs fp32 logits max {r['max_err']:.2e} rms {r['rms_err']:.2e}, argmax equal {r['argmax']:.1%}, "
              f"greedy {r['greedy']}/32 equal ({r['cpu_s']:.0f} CPU s)", flush=True)
        del cm, got
    if args.markdown:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        lines = ["# int8 vs fp32 activation tables on lut-cpu, binary-coded and qlinear layers "
                 "(benchmarks/lut_bcq_tables_accuracy.py)", "",
                 f"Machine: {machine_line()}; load average at the end {load}. {MODEL}, group 128, first "
                 f"{args.windows} windows of {args.ctx} tokens of {EVAL_TEXT.name}; shiftadd fitted with 2 refinement "
                 "rounds, pow2 scales, no calibration. fp32 tables equal the reference target under the same "
                 "quantization (within 1e-3 + 1e-3 |logit|); errors are int8 against fp32 tables of the same module.", "",
                 "| quantization | ppl fp32 tables | ppl int8 tables | change | max logit error / max|logit| "
                 "| rms logit error / rms logit | argmax equal | greedy 32 equal |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['ppl_fp32']:.3f} | {r['ppl_int8']:.3f} | {r['ppl_int8'] / r['ppl_fp32'] - 1:+.1%} "
                  f"| {r['max_err']:.2e} | {r['rms_err']:.2e} | {r['argmax']:.1%} | {r['greedy']}/32 |" for r in rows]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
