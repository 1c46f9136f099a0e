"""Quantized GEMV/GEMM kernels of tvm-cuda against torch fp16 matmul, on one GPU.

Two steps, because the GPU machine has TVM's runtime but not its compiler:

    python benchmarks/gpu_kernels.py --build .gpu/prebuilt/bench   # here: compile + nvcc
    python3 benchmarks/gpu_kernels.py --run .gpu/prebuilt/bench    # GPU machine (< 5 min)

The built kernels hold no weights: ``--run`` makes random packed operands with numpy
(every bit pattern is a valid code) and random fp16 activations. For each weight shape
(N out, K in) and row count m it times, with the same method for all (wall clock over many
back-to-back calls, then a device synchronize, launch overhead included):
  * torch: ``torch.nn.functional.linear`` with fp16 weight and activations (cuBLAS);
  * tvm fp16: our dense fp16 linear kernel;
  * tvm <scheme>: our quantized kernel (decode of the packed grid codes inside the kernel).
Bytes per call = every operand the kernel reads (packed codes, scales, zero points,
selectors, grid table; or the fp16 weight) + activations + output. Achieved GB/s is set
against the device-to-device copy bandwidth measured in the same run (2 x bytes copied /
time, the practical roofline) and the H100 SXM spec of 3.35 TB/s. Each quantized kernel's
output is checked against torch on the dequantized weight (max error / max|ref|, at m=16;
skipped for the 28M-weight lm_head, whose numpy dequantization would cost ~10 s per scheme).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC_GBPS = 3350.0  # H100 SXM5 HBM3, NVIDIA H100 datasheet
SHAPES = {  # name -> (N = out_features, K = in_features)
    "4096x4096": (4096, 4096),
    "smollm2.up": (1536, 576),
    "smollm2.down": (576, 1536),
    "smollm2.lm_head": (49152, 576),
}
SCHEMES = ("rtn-int4", "bitmod-w4", "bitmod-w3", "rtn-int2")
GROUP = 128
MS = (1, 16, 128)
CHECK_MAX_WEIGHTS = 1 << 24  # numpy dequantization for the check costs seconds per 16M weights

def qattrs(scheme: str, n: int, k: int) -> dict[str, Any]:
    return dict(scheme=scheme, group_size=GROUP, in_features=k, out_features=n, sparsity="", outliers=0.0,
                bias=False)


def random_ir_operands(attrs: dict[str, Any], rng: np.random.Generator) -> list[np.ndarray]:
    """Random constant operands of a qlinear in IR order (``ir.quantized.operand_types``)."""
    from bitsmith.ir.quantized import operand_types
    out = []
    for role, t in operand_types(attrs):
        shape = tuple(int(d) for d in t.shape)
        if role == "scales":
            out.append((rng.random(shape, dtype=np.float32) * 0.01 + 0.002).astype(np.float16))
        elif role == "zeros":
            out.append(rng.integers(0, 1 << int(attrs["scheme"][-1]), shape, dtype=np.uint8))
        else:  # packed codes / selectors: any bit pattern decodes to a valid code
            out.append(rng.integers(0, 256, shape, dtype=np.uint8))
    return out


# ---------------------------------------------------------------- build (TVM compiler, no GPU)

def build(out: Path, arch: str) -> None:
    from bitsmith.backends.tvm.cuda_bundle import save_kernel
    from bitsmith.backends.tvm.matmul import linear_kernel, qlinear_kernel
    from bitsmith.backends.tvm.qlinear_layout import qlinear_operands
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"arch": arch, "shapes": SHAPES, "schemes": list(SCHEMES), "group": GROUP, "kernels": {}}
    t0 = time.perf_counter()
    for shape, (n, k) in SHAPES.items():
        name = f"dense_{shape}"
        save_kernel(linear_kernel(k, n, False, "float16", "float16"), out, name, arch)
        index["kernels"][name] = {"shape": shape, "impl": "tvm fp16"}
        for scheme in SCHEMES:
            attrs = qattrs(scheme, n, k)
            ops = qlinear_operands(attrs, random_ir_operands(attrs, rng), "float16")
            name = f"q_{scheme}_{shape}"
            save_kernel(qlinear_kernel(attrs, ops, "float16"), out, name, arch)
            index["kernels"][name] = {"shape": shape, "impl": f"tvm {scheme}", "attrs": attrs}
            print(f"built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "bench.json").write_text(json.dumps(index, indent=1, sort_keys=True))


# ---------------------------------------------------------------- run (TVM runtime + GPU)

def time_calls(fn: Callable[[], None], sync: Callable[[], None], min_seconds: float = 0.05,
               max_reps: int = 2000) -> float:
    """Seconds per call: warm up, then back-to-back calls for at least ``min_seconds``."""
    for _ in range(3):
        fn()
    sync()
    reps, elapsed = 8, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or reps >= max_reps:
            return elapsed / reps
        reps = min(max_reps, reps * 4)


def copy_bandwidth(torch: Any) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + bytes written)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = time_calls(lambda: b.copy_(a), torch.cuda.synchronize, 0.2, 50)
    return 2 * a.numel() / t / 1e9


def machine() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"


def run(bench: Path, ms: tuple[int, ...], trust_native_code: bool = False) -> None:
    import torch
    import tvm
    from bitsmith.backends.tvm.cuda_runtime import gpu_available
    gpu_available()  # registers TVM's CUDA runtime under TVM_USE_RUNTIME_LIB=1
    from bitsmith.backends.tvm.cuda_bundle import load_kernel
    from bitsmith.backends.tvm.qlinear_layout import qlinear_operands
    from bitsmith.ir.quantized import dequantize
    index = json.loads((bench / "bench.json").read_text())
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA GPU visible to TVM")
    rng = np.random.default_rng(0)
    copy_gbps = copy_bandwidth(torch)
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, TVM {tvm.__version__}, kernels built for {index['arch']}")
    print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s measured; H100 SXM spec {SPEC_GBPS:.0f} GB/s")
    print("timing: wall clock over back-to-back calls + synchronize (launch overhead included)")
    head = f"{'shape':>16} {'m':>4} {'impl':>16} {'ms':>9} {'GB/s':>7} {'%copy':>6} {'%spec':>6} {'vs torch':>8} {'err':>8}"
    print(head)
    print("-" * len(head))
    sync = torch.cuda.synchronize
    for shape, (n, k) in index["shapes"].items():
        w16 = torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
        kernels = {name: meta for name, meta in index["kernels"].items() if meta["shape"] == shape}
        loaded = {}
        for name, meta in kernels.items():
            fn, _ = load_kernel(bench, name, trust_native_code=trust_native_code)
            if "attrs" in meta:
                attrs = meta["attrs"]
                ir_ops = random_ir_operands(attrs, rng)
                ops = qlinear_operands(attrs, ir_ops, "float16")
                w_ref = (torch.from_numpy(dequantize(attrs, ir_ops).astype(np.float16)).cuda()
                         if n * k <= CHECK_MAX_WEIGHTS else None)
            else:
                ops = [w16.cpu().numpy()]
                w_ref = w16
            loaded[name] = (fn, [tvm.runtime.tensor(o, dev) for o in ops], sum(o.nbytes for o in ops), w_ref, meta)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            io_bytes = 2 * m * (k + n)
            t_torch = time_calls(lambda: torch.nn.functional.linear(x, w16), sync)
            gbps = (2 * n * k + io_bytes) / t_torch / 1e9
            print(f"{shape:>16} {m:>4} {'torch fp16':>16} {t_torch * 1e3:9.4f} {gbps:7.0f} {100 * gbps / copy_gbps:6.1f} "
                  f"{100 * gbps / SPEC_GBPS:6.1f} {1.0:8.2f} {'':>8}")
            xt = tvm.runtime.tensor(x.cpu().numpy(), dev)
            yt = tvm.runtime.empty((m, n), "float16", dev)
            for name, (fn, ops, op_bytes, w_ref, meta) in loaded.items():
                t = time_calls(lambda: fn(xt, *ops, yt), dev.sync)
                gbps = (op_bytes + io_bytes) / t / 1e9
                err = ""
                if w_ref is not None and (m == 16 or m == ms[0] and 16 not in ms):
                    ref = torch.nn.functional.linear(x.float(), w_ref.float()).cpu().numpy()
                    fn(xt, *ops, yt)
                    err = f"{np.abs(yt.numpy().astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30):8.1e}"
                print(f"{shape:>16} {m:>4} {meta['impl']:>16} {t * 1e3:9.4f} {gbps:7.0f} {100 * gbps / copy_gbps:6.1f} "
                      f"{100 * gbps / SPEC_GBPS:6.1f} {t_torch / t:8.2f} {err:>8}")
            sys.stdout.flush()
        del loaded, w16
        torch.cuda.empty_cache()
    print("GB/s counts bytes read + written per call; vs torch = torch time / our time (>1: faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description="tvm-cuda quantized GEMV/GEMM vs torch fp16 (see module doc)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", type=Path, help="compile the kernels into this folder (needs TVM's compiler)")
    g.add_argument("--run", type=Path, help="benchmark the kernels of this folder (needs a GPU)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="row counts, comma-separated")
    ap.add_argument("--trust-native-code", action="store_true",
                    help="load kernel libraries built on another machine (not in this one's trust store)")
    a = ap.parse_args()
    if a.build:
        build(a.build, a.arch)
    else:
        run(a.run, tuple(int(v) for v in a.ms.split(",")), a.trust_native_code)


if __name__ == "__main__":
    main()
