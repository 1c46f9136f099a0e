"""Dense and quantized GEMV/GEMM kernels of tvm-cuda against torch fp16 matmul, on one GPU.

Two steps, because the GPU machine has TVM's runtime but not its compiler:

    python benchmarks/gpu_kernels.py --build .gpu/prebuilt/bench   # here: compile + nvcc
    python3 benchmarks/gpu_kernels.py --run .gpu/prebuilt/bench    # GPU machine (< 3 min)

The built kernels hold no weights: ``--run`` makes random packed operands with numpy
(every bit pattern is a valid code) and random fp16 activations. Each kernel library holds
one function per row regime (GEMV for m <= 8, tensor-core GEMMs for larger m; column
``fn``); the runtime's dispatch picks it as it would in a model. For each weight shape
(N out, K in) and row count m it times, with the same two methods for every implementation:
  * wall: back-to-back calls then a device synchronize, launch overhead included;
  * kernel: CUDA events around back-to-back calls queued behind a ``torch.cuda._sleep``
    (so the GPU runs them without gaps while Python launches them), per call; operands
    rotate over copies totalling >= 2x the L2 cache, so weights stream from HBM as in a
    model, not from L2.
Implementations: torch ``F.linear`` fp16 (cuBLAS), our dense fp16 linear, our quantized
kernels (decode inside the kernel). Figures: GB/s = bytes every operand read + output
written per call / kernel time, against the device-to-device copy bandwidth measured in the
same run (2 x bytes copied / time: the practical roofline of a memory-bound GEMV); TFLOP/s =
2 m N K / kernel time, against the dense fp16 tensor-core peak of the device's datasheet
(``DATASHEET``; mma.sync, which these kernels use, does not reach Hopper's wgmma peak).
Each kernel's output is checked against torch on the dequantized weight (max error /
max|ref|, at m = 16 and 128; skipped for the 28M-weight lm_head, whose numpy dequantization
costs ~10 s per scheme). Goals (issue 16): dense fp16 >= 0.8x torch at m = 128; quantized
>= 1.0x torch at m <= 16 and >= 0.7x at m = 128; W4 GEMV >= 70 % of copy bandwidth.
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

# Datasheet figures by device-name substring (first match): memory bandwidth (GB/s) and dense
# fp16 tensor-core peak (TFLOP/s; the datasheets list it "with sparsity", twice the dense
# rate). NVIDIA H100 Tensor Core GPU datasheet: SXM 3.35 TB/s, 1,979 TF sparse; PCIe 2 TB/s,
# 1,513 TF sparse; NVL 3.9 TB/s, 1,671 TF sparse. NVIDIA H200 Tensor Core GPU datasheet:
# SXM 4.8 TB/s, 1,979 TF sparse; NVL 4.8 TB/s, 1,671 TF sparse.
DATASHEET = (("H200 NVL", 4800.0, 835.5), ("H200", 4800.0, 989.5), ("H100 PCIe", 2000.0, 756.5),
             ("H100 NVL", 3900.0, 835.5), ("H100", 3350.0, 989.5))
L2_ROTATE_BYTES = 2 * 50 * 2**20  # H100/H200 have 50 MB of L2: rotate operands over >= twice that
SHAPES = {  # name -> (N = out_features, K = in_features)
    "4096x4096": (4096, 4096),
    "smollm2.up": (1536, 576),
    "smollm2.down": (576, 1536),
    "smollm2.lm_head": (49152, 576),
}
SCHEMES = ("rtn-int4", "bitmod-w4", "bitmod-w3", "rtn-int2", "fp4")
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
        meta = save_kernel(linear_kernel(k, n, False, "float16", "float16"), out, name, arch)
        index["kernels"][name] = {"shape": shape, "impl": "tvm fp16", "schedules": dict(zip(meta["functions"],
                                                                                         meta["schedules"]))}
        for scheme in SCHEMES:
            attrs = qattrs(scheme, n, k)
            ops = qlinear_operands(attrs, random_ir_operands(attrs, rng), "float16")
            name = f"q_{scheme}_{shape}"
            meta = save_kernel(qlinear_kernel(attrs, ops, "float16"), out, name, arch)
            index["kernels"][name] = {"shape": shape, "impl": f"tvm {scheme}", "attrs": attrs,
                                      "schedules": dict(zip(meta["functions"], meta["schedules"]))}
            print(f"built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "bench.json").write_text(json.dumps(index, indent=1, sort_keys=True))


# ---------------------------------------------------------------- run (TVM runtime + GPU)

def time_calls(fn: Callable[[int], None], sync: Callable[[], None], min_seconds: float = 0.05,
               max_reps: int = 2000) -> float:
    """Wall seconds per call: warm up, then back-to-back calls for at least ``min_seconds``
    (``fn(i)`` makes call i, on operand copy i % copies)."""
    for i in range(3):
        fn(i)
    sync()
    reps = 8
    while True:
        t0 = time.perf_counter()
        for i in range(reps):
            fn(i)
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or reps >= max_reps:
            return elapsed / reps
        reps = min(max_reps, reps * 4)


_SLEEP_RATE: list[float] = []


def sleep_rate(torch: Any) -> float:
    """Cycles per second of ``torch.cuda._sleep``, measured once with CUDA events."""
    if not _SLEEP_RATE:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm up
        start.record()
        torch.cuda._sleep(20_000_000)
        end.record()
        end.synchronize()
        _SLEEP_RATE.append(20_000_000 / (start.elapsed_time(end) / 1e3))
    return _SLEEP_RATE[0]


def kernel_time(torch: Any, fn: Callable[[int], None], wall: float, reps: int = 100) -> float:
    """Seconds per call between CUDA events, the calls queued behind a GPU sleep longer than
    launching them takes (wall time per call bounds the launch cost), so they run back to back.
    ``run`` puts TVM's launches on torch's current stream, where the events are recorded."""
    cycles_per_s = sleep_rate(torch)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(min(2.0 * reps * wall + 1e-3, 0.5) * cycles_per_s))
    start.record()
    for i in range(reps):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth(torch: Any) -> float:
    """GB/s of a device-to-device copy of 1 GiB (bytes read + bytes written), kernel time."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    wall = time_calls(lambda i: b.copy_(a), torch.cuda.synchronize, 0.2, 50)
    t = kernel_time(torch, lambda i: b.copy_(a), wall, reps=20)
    return 2 * a.numel() / t / 1e9


def machine() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.memory",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"


def datasheet(name: str) -> tuple[str, float, float]:
    for key, gbps, tflops in DATASHEET:
        if key in name:
            return key, gbps, tflops
    return "unknown device (H100 SXM figures)", 3350.0, 989.5


def regime(functions: list[str], m: int) -> str:
    """The function the runtime's LinearDispatch calls for m rows."""
    from bitsmith.backends.tvm.cuda_runtime import ROW_LIMITS
    fits = sorted((ROW_LIMITS[f], f) for f in functions if f in ROW_LIMITS and m <= ROW_LIMITS[f])
    return fits[0][1] if fits else "main"


def copies_for(nbytes: int) -> int:
    return max(1, min(64, -(-L2_ROTATE_BYTES // max(nbytes, 1))))


def run(bench: Path, ms: tuple[int, ...], trust_native_code: bool = False) -> None:
    """TVM's kernels launch on torch's current stream (tvm_ffi's stream context), the stream
    the CUDA events are recorded on."""
    import torch  # noqa: F401 - use_torch_stream needs it loaded
    import tvm_ffi
    with tvm_ffi.use_torch_stream():
        _run(bench, ms, trust_native_code)


def _run(bench: Path, ms: tuple[int, ...], trust_native_code: bool) -> None:
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
    name = torch.cuda.get_device_name(0)
    sheet, spec_gbps, peak_tflops = datasheet(name)
    copy_gbps = copy_bandwidth(torch)
    print(f"machine: {machine()}")
    print(f"torch {torch.__version__}, TVM {tvm.__version__}, kernels built for {index['arch']}")
    print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s measured (kernel time); datasheet ({sheet}) "
          f"{spec_gbps:.0f} GB/s; dense fp16 tensor-core peak (datasheet) {peak_tflops:.1f} TFLOP/s")
    print("wall: back-to-back calls + synchronize; kernel: CUDA events, calls queued behind a GPU sleep; "
          "operands rotate over >= 100 MB (no L2 reuse)")
    head = (f"{'shape':>16} {'m':>4} {'impl':>16} {'fn':>10} {'wall us':>8} {'kern us':>8} {'GB/s':>6} {'%copy':>6} "
            f"{'TFLOP/s':>7} {'%peak':>6} {'x torch':>7} {'x t.wall':>8} {'err':>8}")
    print(head)
    print("-" * len(head))
    sync = torch.cuda.synchronize
    for shape, (n, k) in index["shapes"].items():
        kernels = {kname: meta for kname, meta in index["kernels"].items() if meta["shape"] == shape}
        w_copies = [torch.randn(n, k, dtype=torch.float16, device="cuda") * 0.02
                    for _ in range(copies_for(2 * n * k))]
        loaded = {}
        for kname, meta in kernels.items():
            fn, _ = load_kernel(bench, kname, trust_native_code=trust_native_code)
            functions = list(meta.get("schedules", {})) or ["main"]
            if "attrs" in meta:
                attrs = meta["attrs"]
                ir_ops = random_ir_operands(attrs, rng)
                ops = qlinear_operands(attrs, ir_ops, "float16")
                w_ref = (torch.from_numpy(dequantize(attrs, ir_ops).astype(np.float16)).cuda()
                         if n * k <= CHECK_MAX_WEIGHTS else None)
                op_bytes = sum(o.nbytes for o in ops)
                dev_ops = [tvm.runtime.tensor(o, dev) for o in ops]
                op_sets = [dev_ops] + [[tvm.runtime.tensor(o, dev) for o in ops]
                                       for _ in range(copies_for(op_bytes) - 1)]
            else:
                w_ref = w_copies[0]
                op_bytes = 2 * n * k
                op_sets = [[tvm.runtime.tensor(w.cpu().numpy(), dev)] for w in w_copies]
            loaded[kname] = (fn, op_sets, op_bytes, w_ref, meta, functions)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            io_bytes = 2 * m * (k + n)
            flops = 2.0 * m * n * k

            def torch_call(i: int) -> None:
                torch.nn.functional.linear(x, w_copies[i % len(w_copies)])

            wall_torch = time_calls(torch_call, sync)
            t_torch = kernel_time(torch, torch_call, wall_torch)
            row = lambda impl, fn_name, wall, t, nbytes, err: (  # noqa: E731
                f"{shape:>16} {m:>4} {impl:>16} {fn_name:>10} {wall * 1e6:8.1f} {t * 1e6:8.1f} "
                f"{nbytes / t / 1e9:6.0f} {100 * nbytes / t / 1e9 / copy_gbps:6.1f} {flops / t / 1e12:7.1f} "
                f"{100 * flops / t / 1e12 / peak_tflops:6.1f} {t_torch / t:7.2f} {wall_torch / wall:8.2f} {err:>8}")
            print(row("torch fp16", "cuBLAS", wall_torch, t_torch, 2 * n * k + io_bytes, ""))
            xt = tvm.runtime.tensor(x.cpu().numpy(), dev)
            yt = tvm.runtime.empty((m, n), "float16", dev)
            for kname, (fn, op_sets, op_bytes, w_ref, meta, functions) in loaded.items():
                def call(i: int, fn=fn, op_sets=op_sets) -> None:
                    fn(xt, *op_sets[i % len(op_sets)], yt)

                wall = time_calls(call, dev.sync)
                t = kernel_time(torch, call, wall)
                err = ""
                if w_ref is not None and m in (16, 128):
                    ref = torch.nn.functional.linear(x.float(), w_ref.float()).cpu().numpy()
                    call(0)
                    dev.sync()
                    err = f"{np.abs(yt.numpy().astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-30):8.1e}"
                print(row(meta["impl"], regime(functions, m), wall, t, op_bytes + io_bytes, err))
            sys.stdout.flush()
        del loaded, w_copies
        torch.cuda.empty_cache()
    print("GB/s: bytes read + written per call / kernel time; x torch = torch kernel time / ours, x t.wall = "
          "the same for wall time (> 1: faster); %peak of the dense fp16 tensor-core peak")


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
