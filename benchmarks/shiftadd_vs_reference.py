"""ShiftAddLLM's own quantizer (its public code, GATECH-EIC/ShiftAddLLM, run unchanged from a
checkout outside our tree) against bitsmith's BCQ fit (bitsmith.passes.quantization.bcq_fit) on
the same SmolLM2-135M layers: weight (reconstruction) error and output error side by side.

    git -C /work/.mirror/GATECH-EIC+ShiftAddLLM/repo archive HEAD | tar -x -C /tmp/shiftaddllm
    python benchmarks/shiftadd_vs_reference.py --reference /tmp/shiftaddllm

Their ``quantizers/bcq_quant`` functions call ``.cuda()``; this script runs them on the CPU by
making ``Tensor.cuda`` the identity (no other change). Their quantizer regroups ``w.view(-1,
group_size)``, which is only a per-row grouping when the group size divides K; SmolLM2's K is
576 or 1536, so the comparison uses groups of 64 (both sides).

Rows per layer:
- ``bcq fp``: their ``bcq.quantize`` (greedy + alternating, fp scales) vs ours ``scale="fp16"``;
- ``pow2``: their ``quantize_shift(apot_nums=1)`` (least squares, then each scale rounded to the
  nearest power of two in the log domain) vs ours ``scale="pow2"``;
- ``apot2``: their ``apot_nums=2`` vs ours ``scale="apot2"``; their default ``apot_nums=3`` for
  reference (no counterpart here: three shifts per scale);
- ``+hessian``: GPTQ's column loop with calibration Hessians. Theirs (``quant_methods/shiftaddllm.py``,
  "acc" layout without its QuIP incoherence pre-processing) quantizes each *column* with its own
  scales per group of 64 output rows by ``quantize_shift``; ours fits per-row groups along K at the
  first column of each group. The loop around their quantizer is ours (``gptq_loop_reference``),
  the textbook GPTQ update.

Errors: weight ``‖W-Q‖²/‖W‖²``; output ``tr((W-Q) H (W-Q)ᵀ) / tr(W H Wᵀ)`` with ``H = XᵀX`` from
``--calib-windows`` x 512 tokens of sensesensibility.txt. Results:
benchmarks/results/shiftadd_vs_reference.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from machine import machine_line  # noqa: E402

GROUP = 64
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
          "model.layers.15.self_attn.v_proj", "model.layers.15.mlp.up_proj",
          "model.layers.29.self_attn.o_proj", "model.layers.29.mlp.down_proj")


def import_reference(path: Path):
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self  # their code moves tensors to the GPU
    torch.cuda.empty_cache = lambda: None
    sys.path.insert(0, str(path))
    from quantizers.bcq_quant import bcq, bcq_shift  # noqa: E402
    return bcq, bcq_shift


def rel_errors(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    d = w.astype(np.float64) - q
    return (float(np.sum(d * d) / np.sum(w.astype(np.float64) ** 2)),
            float(np.einsum("nk,kl,nl->", d, h, d) / np.einsum("nk,kl,nl->", w, h, w)))


def gptq_loop_reference(w: np.ndarray, h: np.ndarray, quantize_column, damp: float = 0.01) -> np.ndarray:
    """Textbook GPTQ (explicit upper Cholesky factor of H⁻¹, no lazy blocks) around a
    per-column quantizer ``quantize_column(col [N]) -> q [N]``."""
    from bitsmith.passes.quantization.gptq import inverse_hessian_cholesky
    work = w.astype(np.float64).copy()
    u = inverse_hessian_cholesky(h, damp)
    q = np.zeros_like(work)
    for j in range(w.shape[1]):
        q[:, j] = quantize_column(work[:, j])
        err = (work[:, j] - q[:, j]) / u[j, j]
        work[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="/tmp/shiftaddllm", help="checkout of GATECH-EIC/ShiftAddLLM")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--rounds", type=int, default=10, help="refinement rounds, both sides")
    ap.add_argument("--layers", nargs="+", default=list(LAYERS))
    ap.add_argument("--no-hessian-loop", action="store_true")
    ap.add_argument("--max-rows", type=int, default=None, help="only the first rows of each layer (time)")
    ap.add_argument("--calib-windows", type=int, default=16, help="windows of 512 tokens for H")
    ap.add_argument("--out", default=str(HERE / "results" / "shiftadd_vs_reference.md"))
    args = ap.parse_args()

    import torch
    torch.set_num_threads(2)
    from shiftadd_quality_numpy import TEXT_DIR, hessians, linears, load, token_ids

    from bitsmith.passes.quantization.bcq_fit import fit_bcq
    bcq, bcq_shift = import_reference(Path(args.reference))
    model, tok = load()
    hs = hessians(model, token_ids(tok, TEXT_DIR / "sensesensibility.txt"), 512, args.calib_windows,
                  Path(f"/tmp/smollm2_hessians_{args.calib_windows}x512.npz"))
    mods = linears(model)
    lines = []

    def row(layer: str, bits: int, method: str, theirs: np.ndarray | None, ours: np.ndarray | None,
            w: np.ndarray, h: np.ndarray) -> None:
        cells = []
        for q in (theirs, ours):
            cells += ["—", "—"] if q is None else [f"{e:.5f}" for e in rel_errors(w, q, h)]
        ratio = "—" if theirs is None or ours is None else f"{rel_errors(w, ours, h)[1] / rel_errors(w, theirs, h)[1]:.3f}"
        line = f"| {layer.replace('model.layers.', 'L')} | {bits} | {method} | " + " | ".join(cells) + f" | {ratio} |"
        print(line, flush=True)
        lines.append(line)

    for name in args.layers:
        w = mods[name].weight.detach().numpy().astype(np.float32)[:args.max_rows]
        h = hs[name]
        wt = torch.from_numpy(w.copy())
        for bits in args.bits:
            ref_fp = bcq.quantize(wt.clone(), qbits=bits, rounds=args.rounds, group_size=GROUP, use_bst=True)[0].numpy()
            row(name, bits, "bcq fp", ref_fp, fit_bcq(w, bits, GROUP, "fp16", args.rounds).reconstruct(), w, h)
            for nums, scale in ((1, "pow2"), (2, "apot2"), (3, None)):
                theirs = bcq_shift.quantize_shift(wt.clone(), qbits=bits, rounds=args.rounds, group_size=GROUP,
                                                  use_bst=True, apot_nums=nums)[0].numpy()
                ours = None if scale is None else fit_bcq(w, bits, GROUP, scale, args.rounds).reconstruct()
                row(name, bits, scale or "apot3 (theirs only)", theirs, ours, w, h)
            if args.no_hessian_loop:
                continue
            for nums, scale in ((1, "pow2"), (3, None)):
                def column(c: np.ndarray, nums=nums) -> np.ndarray:
                    t = torch.from_numpy(c[None].astype(np.float32))
                    return bcq_shift.quantize_shift(t, qbits=bits, rounds=args.rounds, group_size=GROUP,
                                                    use_bst=True, apot_nums=nums)[0].numpy()[0]
                theirs = gptq_loop_reference(w, h, column)
                ours = None if scale is None else fit_bcq(w, bits, GROUP, scale, args.rounds, hessian=h).reconstruct()
                row(name, bits, f"{scale or 'apot3 (theirs only)'} +hessian", theirs, ours, w, h)

    out = Path(args.out)
    header = ("# ShiftAddLLM's quantizer vs bitsmith's BCQ fit on SmolLM2-135M layers\n\n"
              f"`python benchmarks/shiftadd_vs_reference.py --rounds {args.rounds} --bits {' '.join(map(str, args.bits))} "
              f"{'' if args.max_rows is None else f'--max-rows {args.max_rows} '}--calib-windows {args.calib_windows}"
              f"{' --no-hessian-loop' if args.no_hessian_loop else ''}`; "
              f"groups of {GROUP}; relative errors (lower is better), ratio = ours/theirs output error. "
              "See the script's docstring for what each row runs.\n\n"
              "| layer | bits | method | theirs weight | theirs output | ours weight | ours output | ratio |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|\n")
    out.write_text(header + "\n".join(lines) + f"\n\nMachine: {machine_line()}\n")


if __name__ == "__main__":
    main()
