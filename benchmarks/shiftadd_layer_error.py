"""Calibrated output error of single SmolLM2 layers: rtn-int (plain and GPTQ) beside shiftadd
pow2/apot2 with offset in the calibrated column loop, on the same Hessian. A cheap check of the
fit when whole-model perplexity runs do not fit the machine's time.

    python benchmarks/shiftadd_layer_error.py model.layers.0.self_attn.q_proj model.layers.10.mlp.down_proj

Hessians: XᵀX/tokens cached by shiftadd_quality_numpy.py (``--hessians``, default 4 x 512
tokens of sensesensibility.txt). Output error: tr(D H Dᵀ) / tr(W H Wᵀ), D = W - Q. CPU seconds
are process time (one process, so comparable within a line).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shiftadd_quality_numpy import GROUP_SIZE, linears, load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layers", nargs="+")
    ap.add_argument("--hessians", default="/tmp/smollm2_hessians_4x512.npz")
    args = ap.parse_args()
    from bitsmith.ir.quant_grids import get_scheme
    from bitsmith.passes.quantization.bcq_fit import fit_bcq
    from bitsmith.passes.quantization.gptq import gptq_quantize_matrix
    from bitsmith.passes.quantization.groups import dequantize_matrix, quantize_matrix
    model, _ = load()
    layers = linears(model)
    hessians = np.load(args.hessians)
    for name in args.layers:
        w = layers[name].weight.detach().numpy().astype(np.float64)
        h = hessians[name]

        def error(q: np.ndarray) -> float:
            d = w - q
            return float(np.einsum("nk,kj,nj->", d, h, d) / np.einsum("nk,kj,nj->", w, h, w))

        def timed(fn):
            t = time.process_time()
            q = fn()
            return error(q), time.process_time() - t
        for bits in (3, 2):
            scheme = get_scheme(f"rtn-int{bits}")
            rows = {
                "rtn": timed(lambda: dequantize_matrix(quantize_matrix(w, scheme, GROUP_SIZE), scheme, GROUP_SIZE)),
                "rtn+gptq": timed(lambda: dequantize_matrix(gptq_quantize_matrix(w, h, scheme, GROUP_SIZE), scheme,
                                                            GROUP_SIZE)),
            }
            for scale in ("pow2", "apot2"):
                rows[f"{scale}+offset+cal"] = timed(lambda: fit_bcq(w, bits, GROUP_SIZE, scale, 0, hessian=h, refits=1,
                                                                    offset=True).reconstruct())
            print(f"{name} w{bits}: " + "  ".join(f"{k} {e:.4f} ({s:.1f} cpu s)" for k, (e, s) in rows.items()),
                  flush=True)


if __name__ == "__main__":
    main()
