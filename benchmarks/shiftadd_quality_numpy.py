"""Research harness for the ShiftAddLLM fit (bitsmith.passes.quantization.bcq_fit): SmolLM2-135M
perplexity with every linear layer replaced by its quantized weights, in torch (fast, no
compile), beside rtn-int at the same widths fitted by bitsmith's own groups/GPTQ code.

The compiled pipeline (benchmarks/quality.py) is the authority for the table in quality.md; this
script answers "which fit works" quickly: a few windows, weights swapped in place.

    python benchmarks/shiftadd_quality_numpy.py --rows fp32 rtn-int3 shiftadd-w3-pow2 --windows 4 --ctx 256
    python benchmarks/shiftadd_quality_numpy.py --rows shiftadd-w3-pow2+cal --only 'mlp.down_proj'

Row names: ``fp32``; ``rtn-int{2,3,4}``; ``shiftadd-w{2,3,4}-{pow2,apot2,fp16}``; suffix ``+cal``
(GPTQ loop with calibration Hessians, 16 windows of 512 tokens of sensesensibility.txt, one run of
the fp32 model: non-sequential), ``+act`` (act-order) and ``+off`` (per-group offset, ``fit_bcq(offset=True)``). ``--only REGEX`` quantizes only
the linear layers whose name matches (per-layer ablation). Results are appended to
benchmarks/results/shiftadd_quality_numpy.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import machine_line  # noqa: E402

TEXT_DIR = next(p / "shared" / "data" / "text" for p in HERE.parents if (p / "shared" / "data" / "text").is_dir())
GROUP_SIZE = 128


def load():
    from bitsmith.frontend.models import load_pretrained
    model, tok = load_pretrained("smollm2-135m")
    return model.train(False), tok  # inference mode


def token_ids(tok, path: Path) -> np.ndarray:
    return np.asarray(tok.encode(path.read_text(encoding="utf-8")), dtype=np.int64)


def linears(model) -> dict[str, object]:
    import torch
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


def perplexity(model, ids: np.ndarray, ctx: int, windows: int) -> float:
    import torch
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in range(windows):
            x = torch.from_numpy(ids[w * ctx:(w + 1) * ctx][None])
            logits = model(x).logits[0].double()
            nll += torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum").item()
            count += ctx - 1
    return float(np.exp(nll / count))


def hessians(model, ids: np.ndarray, ctx: int, windows: int, cache: Path) -> dict[str, np.ndarray]:
    """XᵀX / tokens of every linear input over the calibration windows (cached in ``cache``)."""
    import torch
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    acc: dict[str, np.ndarray] = {}
    hooks = []
    for name, m in linears(model).items():
        def hook(mod, inp, out, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double().numpy()
            acc[name] = acc.get(name, 0) + x.T @ x
        hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        for w in range(windows):
            model(torch.from_numpy(ids[w * ctx:(w + 1) * ctx][None]))
    for h in hooks:
        h.remove()
    out = {k: v / (ctx * windows) for k, v in acc.items()}
    np.savez(cache, **out)
    return out


def quantize_weight(row: str, w: np.ndarray, hessian: np.ndarray | None, iterations: int, refits: int) -> np.ndarray:
    """The dense weight ``row``'s quantization of ``w`` stands for."""
    base = row.split("+")[0]
    act = "+act" in row
    if base.startswith("rtn-int"):
        from bitsmith.ir.quant_grids import get_scheme
        from bitsmith.passes.quantization.gptq import gptq_quantize_matrix
        from bitsmith.passes.quantization.groups import dequantize_matrix, quantize_matrix
        scheme = get_scheme(base)
        qm = (quantize_matrix(w, scheme, GROUP_SIZE) if hessian is None
              else gptq_quantize_matrix(w, hessian, scheme, GROUP_SIZE, act_order=act))
        return dequantize_matrix(qm, scheme, GROUP_SIZE)
    m = re.fullmatch(r"shiftadd-w(\d)-(pow2|apot2|fp16)", base)
    if not m:
        raise SystemExit(f"unknown row {row!r}")
    from bitsmith.passes.quantization.bcq_fit import fit_bcq
    return fit_bcq(w, int(m.group(1)), GROUP_SIZE, m.group(2), iterations, hessian=hessian,
                   act_order=act, refits=refits, offset="+off" in row).reconstruct()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["fp32", "rtn-int3", "shiftadd-w3-pow2"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--refits", type=int, default=1, help="output-optimal scale refits (+cal rows)")
    ap.add_argument("--coverage", type=float, default=None,
                    help="override bcq_fit's coverage of each group's largest weight (pow2/apot2)")
    ap.add_argument("--only", default=None, help="regex: quantize only matching linear layers")
    ap.add_argument("--out", default=str(HERE / "results" / "shiftadd_quality_numpy.md"))
    args = ap.parse_args()

    import torch
    torch.set_num_threads(2)
    from bitsmith.passes.quantization import bcq_fit
    bcq_fit.COVERAGE = args.coverage
    model, tok = load()
    ids = token_ids(tok, TEXT_DIR / "prideprejudice.txt")
    layers = linears(model)
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    hs = None
    lines = []
    for row in args.rows:
        t0 = time.time()
        if row != "fp32":
            if "+cal" in row and hs is None:
                cids = token_ids(tok, TEXT_DIR / "sensesensibility.txt")
                hs = hessians(model, cids, args.calib_ctx, args.calib_windows,
                              Path(f"/tmp/smollm2_hessians_{args.calib_windows}x{args.calib_ctx}.npz"))
            for name, mod in layers.items():
                w = original[name].numpy()
                if args.only and not re.search(args.only, name):
                    q = w
                else:
                    q = quantize_weight(row, w, hs[name] if "+cal" in row else None, args.iterations,
                                       args.refits)
                mod.weight.data = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
        tq = time.time() - t0
        ppl = perplexity(model, ids, args.ctx, args.windows)
        for name, mod in layers.items():
            mod.weight.data = original[name].clone()
        cov = "" if args.coverage is None or "shiftadd" not in row else f" cov={args.coverage}"
        line = (f"| {row}{cov} | {args.only or 'all'} | {ppl:.3f} | {args.windows}x{args.ctx} | "
                f"{args.iterations} | {args.refits if '+cal' in row and 'shiftadd' in row else '—'} | {tq:.0f} |")
        print(line, flush=True)
        lines.append(line)
    out = Path(args.out)
    if not out.exists():
        out.write_text("# ShiftAddLLM fit research: SmolLM2-135M perplexity, weights swapped in torch\n\n"
                       "Produced by `benchmarks/shiftadd_quality_numpy.py` (see its docstring); eval on the "
                       "first windows of prideprejudice.txt, calibration (+cal) on 16x512 tokens of "
                       "sensesensibility.txt; groups of 128; embeddings and lm_head fp32.\n\n"
                       "| row | layers | ppl | windows x ctx | iterations | refits | quantize s |\n|---|---|---:|---|---:|---:|---:|\n")
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(machine_line())


if __name__ == "__main__":
    main()
