"""tvm-cuda check cases that are built where TVM's compiler is and checked where a GPU is.

Building (this machine: TVM compiler + nvcc, no GPU):
    python tests/cuda_cases.py --build .gpu/prebuilt
writes
    models/<case>/artifact/       a saved tvm-cuda CompiledModel (``cm.save``)
    models/<case>/inputs_<k>.npz  arguments of function "main" (prefill m=8, m=20, decode m=1)
    models/<case>/ref_<k>.npy     the reference target's logits for them (same module)
    qkernels/<case>.{so,fatbin,ptx,json}  one quantized-linear kernel per case
    qkernels/<case>.npz           its operands, activations for m = 1, 5, 16, 33, 130, reference outputs
    dense/<case>.{so,fatbin,ptx,json,npz}  dense fp16 linear kernels, the same way
Checking (GPU machine: TVM runtime only) is ``check_model`` / ``check_qkernel``, used by the
gpu-marked tests in test_tvm_cuda.py. Nothing here is unpickled: .npz/.npy load with
``allow_pickle=False``.

Tolerances (fp16 activations against the float32/float64 oracle):
* logits: max|y - ref| <= 3e-3 * max|ref|. Error model: fp16's unit roundoff is
  u = 2^-11 = 4.9e-4 and every kernel boundary rounds its output to fp16 once (about 10 per
  layer); on these 2-layer models the roundings mostly cancel. The fp16 module on the
  reference interpreter (the same roundings; ``python tests/cuda_cases.py --fp16-errors``)
  lands at 2.7e-4..1.1e-3 of max|ref| over every case and input (0.6u..2.3u), and the H100
  run measured 4.5e-4..7.1e-4 absolute on llama (max|ref| 1.02..1.25), matching the
  interpreter's 4.1e-4..7.0e-4 on the same inputs. 3e-3 (6u) is 2.7x the worst measured case
  (qwen2-bitmod-w3-2of4-ol) and 5x the H100 llama error; a wrong kernel (index, mask,
  decode) moves logits by O(max|ref|).
* quantized linear: |y - ref| <= 2e-3 * (|x| @ |W|.T) + 2e-3 * |ref| elementwise: every
  decoded weight (grid value times fp16 scale) and the fp16 output are rounded once each
  (<= 4.9e-4 relative), the float32 accumulation adds far less; 2e-3 leaves a 2x margin.
  The tensor-core kernels (m > 8) round each weight to fp16 for mma (the same single
  rounding) and accumulate in float32; the dense fp16 cases have exact fp16 inputs, so only
  the output rounding and float32 sums remain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qlinear_cases import make_qlinear  # noqa: F401 - used by the kernel cases and tests

LOGIT_RTOL = 3e-3
QLINEAR_TOL = 2e-3
MODEL_CASES = {  # case -> (architecture, compile options)
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "qwen2": ("qwen2", {}),
    "llama-bitmod-w4": ("llama", {"quant": "bitmod-w4", "group_size": 32}),
    "qwen2-bitmod-w3-2of4-ol": ("qwen2", {"quant": "bitmod-w3", "group_size": 32, "sparsity": "2:4",
                                          "outliers": 0.01}),
}
# (scheme, in, out, group, sparsity, outliers, bias): every scheme, short last groups,
# outliers and N:M
QKERNEL_CASES: dict[str, tuple[str, int, int, int, str, float, bool]] = {}
for _s in ("rtn-int2", "rtn-int3", "rtn-int4", "rtn-int2-sym", "rtn-int3-sym", "rtn-int4-sym",
           "fp3", "fp4", "bitmod-w3", "bitmod-w4"):
    QKERNEL_CASES[_s] = (_s, 320, 96, 128, "", 0.0, False)
QKERNEL_CASES["bitmod-w4-ol-bias"] = ("bitmod-w4", 320, 96, 64, "", 0.02, True)
QKERNEL_CASES["bitmod-w3-2of4"] = ("bitmod-w3", 256, 80, 64, "2:4", 0.0, False)
QKERNEL_CASES["rtn-int4-4of8-ol"] = ("rtn-int4", 256, 72, 32, "4:8", 0.01, False)
QKERNEL_CASES["rtn-int3-g40"] = ("rtn-int3", 200, 88, 40, "", 0.0, False)  # groups straddle 16-weight runs
QKERNEL_CASES["gguf-q4_0"] = ("gguf-q4_0", 256, 72, 32, "", 0.0, False)
# m = 1, 5: GEMV; 16: tensor cores, 16-row tile; 33, 130: tensor cores, 64x64 tile (row tails)
QKERNEL_MS = (1, 5, 16, 33, 130)
# dense fp16 linear kernels (in, out, bias): K % 8 != 0 takes the scalar tile loads
DENSE_CASES: dict[str, tuple[int, int, bool]] = {"dense-320x96": (320, 96, False),
                                                 "dense-200x72-bias": (200, 72, True),
                                                 "dense-100x40": (100, 40, False)}


# ---------------------------------------------------------------- building (compiler side)

def _model_inputs(module: Any, rng: np.random.Generator, vocab: int) -> list[list[np.ndarray]]:
    """Three argument lists of "main": prefill of 8 and 20 tokens, one decode step after 7."""
    from bitsmith.ir import run_function
    fn = module.function("main")
    kv = [p for p in fn.params[2:] if p.name != "attention_mask"]

    def empty_past() -> list[np.ndarray]:
        return [np.zeros((1,) + tuple(0 if isinstance(d, str) else d for d in p.type.shape[1:]), np.float32)
                for p in kv]

    def ones(n: int) -> list[np.ndarray]:  # the attention_mask (kv-cache pass), every key attended
        return [np.ones((1, n), np.int64)] if len(kv) < len(fn.params) - 2 else []

    cases = []
    for m in (8, 20):
        ids = rng.integers(0, vocab, (1, m))
        cases.append([ids, np.arange(m)[None], *empty_past(), *ones(m)])
    ids = rng.integers(0, vocab, (1, 8))
    outs = run_function(module, "main", [ids[:, :7], np.arange(7)[None], *empty_past(), *ones(7)])
    cases.append([ids[:, 7:], np.array([[7]]), *outs[1:], *ones(8)])
    return cases


def build_models(out: Path) -> None:
    import bitsmith
    from bitsmith.ir import run_function
    from bitsmith.testing.hf_configs import VOCAB, make_model
    rng = np.random.default_rng(0)
    for case, (arch, opts) in MODEL_CASES.items():
        d = out / "models" / case
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        cm = bitsmith.compile(make_model(arch), target="tvm-cuda", **opts)
        cm.save(str(d / "artifact"))
        # the oracle is the float32 module (cm.module is the fp16 one its pipeline made)
        ref_module = bitsmith.compile(make_model(arch), target="reference", **opts).module
        for k, args in enumerate(_model_inputs(ref_module, rng, VOCAB)):
            np.savez(d / f"inputs_{k}.npz", *args)
            np.save(d / f"ref_{k}.npy", run_function(ref_module, "main", args)[0].astype(np.float32))
        print(f"built model case {case}: {cm.report()['executable']['kernels']} kernels", flush=True)


def fp16_interpreter_errors() -> list[tuple[str, int, float, float]]:
    """[(case, input, max|ref|, max|fp16 module - ref|)] on the reference interpreter: the
    measurement LOGIT_RTOL is derived from (same cases and inputs as ``build_models``)."""
    import bitsmith
    from bitsmith.passes.half_precision import to_half
    from bitsmith.ir import run_function
    from bitsmith.testing.hf_configs import VOCAB, make_model
    rng = np.random.default_rng(0)
    out = []
    for case, (arch, opts) in MODEL_CASES.items():
        cm = bitsmith.compile(make_model(arch), target="reference", **opts)
        half = to_half(cm.module)
        for k, args in enumerate(_model_inputs(cm.module, rng, VOCAB)):
            ref = run_function(cm.module, "main", args)[0]
            got = run_function(half, "main", [a.astype(np.float16) if a.dtype == np.float32 else a for a in args])[0]
            out.append((case, k, float(np.abs(ref).max()), float(np.abs(got.astype(np.float64) - ref).max())))
    return out


def qlinear_reference(attrs: dict, arrays: list[np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reference y in float64, elementwise tolerance) for fp16 activations ``x``."""
    from bitsmith.ir.quantized import dequantize
    n_weight = len(arrays) - (1 if attrs["bias"] else 0)
    w = dequantize(attrs, arrays[:n_weight]).astype(np.float64)
    xf = x.astype(np.float64)
    y = xf @ w.T
    if attrs["bias"]:
        y = y + arrays[-1].astype(np.float16).astype(np.float64)
    tol = QLINEAR_TOL * (np.abs(xf) @ np.abs(w).T) + QLINEAR_TOL * np.abs(y) + 1e-6
    return y, tol


def build_qkernels(out: Path) -> None:
    from bitsmith.backends.tvm.cuda_bundle import save_kernel
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    d = out / "qkernels"
    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(1)
    for case, spec in QKERNEL_CASES.items():
        attrs, arrays = make_qlinear(rng, *spec)
        ops = qlinear_operands(attrs, arrays, "float16")
        save_kernel(qlinear_kernel(attrs, ops, "float16"), d, case)
        data: dict[str, np.ndarray] = {f"op{i}": a for i, a in enumerate(ops)}
        for m in QKERNEL_MS:
            x = rng.standard_normal((m, attrs["in_features"])).astype(np.float16)
            y, tol = qlinear_reference(attrs, arrays, x)
            data[f"x{m}"], data[f"y{m}"], data[f"tol{m}"] = x, y, tol
        np.savez(d / f"{case}.npz", **data)
        (d / f"{case}.attrs.json").write_text(json.dumps(attrs, sort_keys=True))
        print(f"built qkernel case {case}", flush=True)


def build_dense_kernels(out: Path) -> None:
    from bitsmith.backends.tvm.cuda_bundle import save_kernel
    from bitsmith.backends.tvm.matmul import linear_kernel
    d = out / "dense"
    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(2)
    for case, (k, n, bias) in DENSE_CASES.items():
        save_kernel(linear_kernel(k, n, bias, "float16", "float16"), d, case)
        w = (rng.standard_normal((n, k)) * 0.1).astype(np.float16)
        data: dict[str, np.ndarray] = {"op0": w}
        if bias:
            data["op1"] = rng.standard_normal(n).astype(np.float16)
        for m in QKERNEL_MS:
            x = rng.standard_normal((m, k)).astype(np.float16)
            xf, wf = x.astype(np.float64), w.astype(np.float64)
            y = xf @ wf.T + (data["op1"].astype(np.float64) if bias else 0.0)
            # inputs are exact fp16; float32 sums and one fp16 rounding of the output
            tol = QLINEAR_TOL * (np.abs(xf) @ np.abs(wf).T) + QLINEAR_TOL * np.abs(y) + 1e-6
            data[f"x{m}"], data[f"y{m}"], data[f"tol{m}"] = x, y, tol
        np.savez(d / f"{case}.npz", **data)
        print(f"built dense kernel case {case}", flush=True)


# ---------------------------------------------------------------- checking (GPU side)

def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def check_model(case_dir: Path, trust_native_code: bool = False) -> list[tuple[str, float, float]]:
    """[(input name, max|y - ref|, allowed)] for every saved input of one model case.
    ``trust_native_code``: the case was built on another machine (its kernel libraries are not
    in this machine's trust store)."""
    import bitsmith
    cm = bitsmith.load(str(case_dir / "artifact"), trust_native_code=trust_native_code)
    results = []
    for inp in sorted(case_dir.glob("inputs_*.npz")):
        k = inp.stem.split("_")[1]
        saved = _npz(inp)
        args = [saved[f"arr_{i}"] for i in range(len(saved))]
        ref = np.load(case_dir / f"ref_{k}.npy", allow_pickle=False)
        y = cm.run("main", args)[0]
        results.append((inp.stem, float(np.abs(y.astype(np.float32) - ref).max()),
                        LOGIT_RTOL * float(np.abs(ref).max())))
    return results


def check_qkernel(directory: Path, case: str, trust_native_code: bool = False) -> list[tuple[int, float]]:
    """[(m, worst |y - ref| / tol)] of one prebuilt quantized kernel; <= 1 passes."""
    import tvm
    from bitsmith.backends.tvm.cuda_runtime import gpu_available
    gpu_available()  # registers TVM's CUDA runtime under TVM_USE_RUNTIME_LIB=1
    from bitsmith.backends.tvm.cuda_bundle import load_kernel
    fn, _ = load_kernel(directory, case, trust_native_code=trust_native_code)
    data = _npz(directory / f"{case}.npz")
    dev = tvm.cuda(0)
    ops = [tvm.runtime.tensor(data[f"op{i}"], dev) for i in range(sum(1 for k in data if k.startswith("op")))]
    out = []
    for m in QKERNEL_MS:
        x, ref, tol = data[f"x{m}"], data[f"y{m}"], data[f"tol{m}"]
        y = tvm.runtime.empty(ref.shape, "float16", dev)
        fn(tvm.runtime.tensor(x, dev), *ops, y)
        err = np.abs(y.numpy().astype(np.float64) - ref)
        out.append((m, float((err / tol).max())))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", help="output folder, e.g. .gpu/prebuilt")
    ap.add_argument("--only", choices=("models", "qkernels"), default=None)
    ap.add_argument("--fp16-errors", action="store_true", help="print the fp16 error LOGIT_RTOL is derived from")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if a.fp16_errors:
        for case, k, scale, err in fp16_interpreter_errors():
            print(f"{case:26s} input {k}: max|ref| {scale:.4f}  fp16 error {err:.2e} = {err / scale:.2e} of max|ref|")
        sys.exit(0)
    if not a.build:
        ap.error("--build is required")
    root = Path(a.build)
    if a.only in (None, "qkernels"):
        build_qkernels(root)
        build_dense_kernels(root)
    if a.only in (None, "models"):
        build_models(root)
