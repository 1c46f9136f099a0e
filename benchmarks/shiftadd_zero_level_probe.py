"""Why pow2 BCQ breaks SmolLM2: perplexity of independent power-of-two-step grids (with and
without a level 0, clipping or covering max|w|) beside bitsmith's fits, weights swapped in torch.

    python benchmarks/shiftadd_zero_level_probe.py REGEX VARIANT...   (e.g. 'self_attn' uni-round uni-zero)

Variants: uni-round, uni-ceil, uni-zero, z5, fit0 (pow2 3-bit), ap / apz (apot2 3-bit without /
with zero_level), rtn3. Prints relative weight MSE and perplexity (4 windows x 256 tokens).
Results: benchmarks/results/shiftadd_quality_numpy.md.
"""
import numpy as np, re, sys, time, torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from shiftadd_quality_numpy import load, linears, perplexity, token_ids, TEXT_DIR, quantize_weight
from bitsmith.passes.quantization.bcq_fit import fit_bcq
torch.set_num_threads(2)
model, tok = load()
L = linears(model)
ids = token_ids(tok, TEXT_DIR / "prideprejudice.txt")
orig = {n: m.weight.detach().clone() for n, m in L.items()}
def pow2uni(w, gs=128, bits=3, rnd=np.round):
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0+gs]
        mx = np.abs(b).max(1, keepdims=True)
        step = 2.0**rnd(np.log2(np.maximum(mx,1e-30)/3.5))
        m = np.clip(np.floor(b/step), -4, 3)
        out[:, g0:g0+gs] = (m+0.5)*step
    return out
def pow2uni_zero(w, gs=128):
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0+gs]
        mx = np.abs(b).max(1, keepdims=True)
        step = 2.0**np.round(np.log2(np.maximum(mx,1e-30)/3.5))
        m = np.clip(np.round(b/step), -4, 3)
        out[:, g0:g0+gs] = m*step
    return out
def z5(w, gs=128):
    out = np.zeros_like(w)
    for g0 in range(0, w.shape[1], gs):
        b = w[:, g0:g0+gs]
        mx = np.abs(b).max(1, keepdims=True)
        best=None
        for off in (-1,0,1):
            step = 2.0**(np.round(np.log2(np.maximum(mx,1e-30)/2))+off)
            q = np.clip(np.round(b/step), -2, 2)*step
            e = np.sum((b-q)**2,1,keepdims=True)
            if best is None: best, be = q, e
            else:
                best = np.where(e<be, q, best); be=np.minimum(e,be)
        out[:, g0:g0+gs] = best
    return out
variants = {
 "uni-round": lambda w: pow2uni(w),
 "uni-ceil": lambda w: pow2uni(w, rnd=np.ceil),
 "uni-zero": lambda w: pow2uni_zero(w),
 "z5": lambda w: z5(w),
 "fit0": lambda w: fit_bcq(w, 3, 128, "pow2", 0).reconstruct(),
 "apz": lambda w: fit_bcq(w, 3, 128, "apot2", 0, zero_level=True).reconstruct(),
 "ap": lambda w: fit_bcq(w, 3, 128, "apot2", 0).reconstruct(),
 "rtn3": lambda w: quantize_weight("rtn-int3", w, None, 0, 0),
}
only = sys.argv[1]
for v in sys.argv[2:]:
    t=time.time(); tot=0; nrm=0
    for n, m in L.items():
        w = orig[n].numpy().astype(np.float64)
        if re.search(only, n):
            q = variants[v](w); tot += np.sum((w-q)**2); nrm += np.sum(w**2)
        else: q = w
        m.weight.data = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    print(v, only, "relMSE", tot/max(nrm,1e-30), "ppl", perplexity(model, ids, 256, 4), "s", time.time()-t, flush=True)
    for n, m in L.items(): m.weight.data = orig[n].clone()
