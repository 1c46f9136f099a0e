"""Per-layer error of int8 activation tables on lut-cpu, on the activations SmolLM2 really feeds
each engine layer (a diagnostic for docs/lut-isa.md section 4b).

One quantized module (a saved lut-cpu artifact, e.g. from benchmarks/lut_bcq_tables_accuracy.py
``--cache``, or a ``--quant`` compiled now) is run three ways on tests/test_lut_smollm2.py's text:
the reference target, lut-cpu with int8 tables and with fp32 tables (logit error against the
reference: max |difference| / max |logit|, argmax agreement, greedy 32 tokens after 8). Then the
int8 build runs once more on the reference-interpreter host, recording every engine layer's
input, and each layer's int8 output is compared with the fp32-table output on that same input
(relative Frobenius error); binary-coded layers also against the float64 product with their
dequantized weight.

    python benchmarks/lut_layer_int8_error.py --artifact /tmp/bcq-cache/shiftadd-w3-offset
    python benchmarks/lut_layer_int8_error.py --quant rtn-int3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_lut_bcq_smollm2 import int8_engine_calls  # noqa: E402
from test_lut_smollm2 import TEXT  # noqa: E402


def main() -> None:
    import bitsmith
    from bitsmith.backends import backend_for_target
    from bitsmith.backends.lut import engine_nodes
    from bitsmith.frontend.models import load_pretrained
    from bitsmith.ir import bcq
    from bitsmith.runtime.generate import forward_logits
    from lut_bcq_tables_accuracy import with_tables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="a saved lut-cpu build")
    src.add_argument("--quant", help="a scheme to compile now (e.g. rtn-int3)")
    ap.add_argument("--worst", type=int, default=8, help="print this many worst layers")
    args = ap.parse_args()
    model, tokenizer = load_pretrained("smollm2-135m")
    base = (bitsmith.load(args.artifact, trust_native_code=True) if args.artifact
            else bitsmith.compile(model, target="lut-cpu", quant=args.quant, tokenizer=tokenizer))
    ids = np.asarray(tokenizer(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int64)[None, :]
    rb = backend_for_target("reference")
    ref = dataclasses.replace(base, executable=rb.build(base.module, "reference", rb.option_defaults("reference")),
                              target="reference")
    a = forward_logits(ref.run, ref.module, ids)[0]
    want = np.asarray(ref.generate(ids[:, :8], max_new_tokens=32))[0, 8:]
    builds = {tables: with_tables(base, tables) for tables in ("int8", "fp32")}
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for tables, cm in builds.items():
        b = forward_logits(cm.run, cm.module, ids)[0]
        got = np.asarray(cm.generate(ids[:, :8], max_new_tokens=32))[0, 8:]
        print(f"{tables} tables vs reference: max |dlogit| {np.abs(a - b).max() / np.abs(a).max():.2e} of max|logit|, "
              f"argmax {(a.argmax(-1) == b.argmax(-1)).sum()}/{len(a)}, greedy {(got == want).sum()}/32 equal")
    nodes = {(fn.name, node.outputs[0].name): (node, c) for fn, node, c in engine_nodes(base.module)}
    fast = builds["int8"].executable.fast
    rows = []
    for entry, x, y8 in int8_engine_calls(base.module, list(base.executable.layers.values()), ids):
        y32 = fast.run(entry.program, x, False)
        row = {"layer": entry.layer, "xmax": float(np.abs(x).max()),
               "rel": float(np.linalg.norm(y8 - y32) / np.linalg.norm(y32))}
        node, constants = nodes[(entry.function, entry.value)]
        if node.op == bcq.OP:
            attrs = node.attr_dict
            ops = [base.module.tensors[constants[v]] for v in node.inputs[1:1 + len(bcq.operand_types(attrs))]]
            exact = x.astype(np.float64) @ bcq.dequantize(attrs, ops).astype(np.float64).T
            row["fp32_vs_exact"] = float(np.linalg.norm(y32 - exact) / np.linalg.norm(exact))
        rows.append(row)
    rel = np.array([r["rel"] for r in rows])
    down = np.array([r["rel"] for r in rows if "down_proj" in r["layer"]])
    print(f"{len(rows)} engine layers: int8 vs fp32 tables relative error median {np.median(rel):.4f}, "
          f"max {rel.max():.4f}; down_proj median {np.median(down) if down.size else float('nan'):.4f}")
    for r in sorted(rows, key=lambda r: -r["rel"])[:args.worst]:
        print(f"  {r['layer']:<45} rel {r['rel']:.4f}  max|x| {r['xmax']:.1f}"
              + (f"  fp32 vs exact {r['fp32_vs_exact']:.1e}" if "fp32_vs_exact" in r else ""))


if __name__ == "__main__":
    main()
