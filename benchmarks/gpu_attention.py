"""tvm-cuda attention kernels (split-KV decode with unified max, tiled prefill) against torch
fp16 ``scaled_dot_product_attention``, on one GPU; also their correctness cases.

Two steps, because the GPU machine has TVM's runtime but not its compiler (as
benchmarks/gpu_kernels.py and tests/cuda_cases.py):

    python benchmarks/gpu_attention.py --build .gpu/prebuilt/attention   # here: TIR -> CUDA -> nvcc
    python3 benchmarks/gpu_attention.py --run .gpu/prebuilt/attention --trust-native-code   # GPU machine

``--run`` first checks every correctness case (``check_all``: decode at chunk edges, decode
with 3 query rows, ragged left-padded batches, prefill with a past, a case whose scores leave
the unified max's window so chunks fall back) against the float64 oracle of the reference
interpreter, then times each shape. Kernels hold no data: inputs are random fp16 (the KV
cache the model's attention reads is fp16 under act_dtype float16).

Timing: CUDA events around back-to-back calls on the default stream (kernel time, launch
gaps included only where the GPU idles between launches) and wall clock; torch runs
``F.scaled_dot_product_attention`` (fp16, enable_gqa; is_causal for prefill) on the same
shapes in the same process. Decode GB/s counts the K and V bytes read (the roofline of
decode attention) against the device-to-device copy bandwidth measured in the same run.

Tolerance of the checks: max|out - ref| <= 1e-3 * max|v|: the output is rounded to fp16 once
(unit roundoff 4.9e-4 of |out| <= max|v|) on top of float32 sums (<= 1e-5 * max|v|, measured
on the numpy emulation, tests/test_attention_cuda.py); a dropped key or chunk, a wrong
rescale or a missed fallback costs O(max|v|).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

CHECK_TOL = 1e-3
# name -> (heads, kv_heads, head_dim, value_dim, causal, dtype, mask dtype)
CONFIGS: dict[str, tuple[int, int, int, int, bool, str, str | None]] = {
    "smollm2": (9, 3, 64, 64, True, "float16", "int64"),      # SmolLM2-135M: 9 q / 3 kv heads, d 64
    "llama1b": (32, 8, 64, 64, True, "float16", "int64"),     # Llama-3.2-1B shape: 32 q / 8 kv heads, d 64
    "plain-fp32": (4, 2, 32, 16, False, "float32", None),     # no mask, not causal, dv != d, fp32
}
DECODE = [(1, 512), (1, 2048), (1, 8192), (16, 512), (16, 2048)]   # (batch, kv length), one query row
PREFILL = [(1, 512), (1, 2048), (4, 512)]                          # (batch, length), past 0


def build(out: Path, arch: str) -> None:
    from bitsmith.backends.tvm.attention_cuda import flash_attention_kernel
    from bitsmith.backends.tvm.cuda_bundle import save_kernel
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name, (h, kvh, d, dv, causal, dtype, mask) in CONFIGS.items():
        save_kernel(flash_attention_kernel(h, kvh, d, dv, d ** -0.5, causal, dtype, mask), out, name, arch)
        print(f"built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "attention.json").write_text(json.dumps({"arch": arch, "configs": CONFIGS}, indent=1, sort_keys=True))


# ---------------------------------------------------------------- GPU side

class Kernel:
    """A loaded bundle called on numpy inputs (uploads, allocates split buffers, downloads)."""

    def __init__(self, bundles: Path, name: str, trust_native_code: bool) -> None:
        import tvm
        from bitsmith.backends.tvm.cuda_bundle import load_kernel
        self.tvm, self.dev = tvm, tvm.cuda(0)
        self.fn, self.kernel = load_kernel(bundles, name, trust_native_code=trust_native_code)
        self.cfg = CONFIGS[name]

    def prepare(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> Callable[[], Any]:
        tvm, dev = self.tvm, self.dev
        arrays = (q, k, v) + ((mask,) if mask is not None else ())
        ins = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrays]
        scratch = [tvm.runtime.empty(s.shape(ins), s.dtype, dev) for s in self.kernel.scratch]
        out = tvm.runtime.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), self.cfg[5], dev)
        self.out = out
        return lambda: self.fn(*ins, *scratch, out)

    def __call__(self, q, k, v, mask) -> np.ndarray:
        self.prepare(q, k, v, mask)()
        return self.out.numpy().astype(np.float32)


def _inputs(rng: np.random.Generator, cfg, b: int, s: int, t: int, q_scale: float = 1.0):
    h, kvh, d, dv, _, dtype, mask_dtype = cfg
    q = (rng.standard_normal((b, h, s, d)) * q_scale).astype(dtype)
    k = rng.standard_normal((b, kvh, t, d)).astype(dtype)
    v = rng.standard_normal((b, kvh, t, dv)).astype(dtype)
    mask = np.ones((b, t), dtype=mask_dtype) if mask_dtype else None
    return q, k, v, mask


def check_all(bundles: Path, trust_native_code: bool = False) -> list[str]:
    """Every correctness case of every config; returns the failures (empty: all passed)."""
    from bitsmith.ir.interpreter import causal_attention
    rng = np.random.default_rng(0)
    failures = []
    for name, cfg in CONFIGS.items():
        kern = Kernel(bundles, name, trust_native_code)
        causal = cfg[4]
        cases = [("decode t=1", 1, 1, 1, 1.0), ("decode t=128", 2, 1, 128, 1.0), ("decode t=129", 2, 1, 129, 1.0),
                 ("decode t=1000", 1, 1, 1000, 1.0), ("decode s=3 t=300", 2, 3, 300, 1.0),
                 ("decode fallback (scores ~ +-300)", 1, 1, 700, 40.0),
                 ("prefill s=t=77", 1, 77, 77, 1.0), ("prefill s=70 past 130", 2, 70, 200, 1.0),
                 ("prefill fallback-size scores", 1, 40, 90, 40.0)]
        for label, b, s, t, q_scale in cases:
            q, k, v, mask = _inputs(rng, cfg, b, s, t, q_scale)
            if mask is not None and b > 1:  # a ragged batch: row 1 left-padded by t // 3 columns
                mask[1, : t // 3] = 0
            got = kern(q, k, v, mask)
            ref = causal_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64),
                                   cfg[2] ** -0.5, causal, mask)
            err = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
            allowed = CHECK_TOL * float(np.abs(v.astype(np.float32)).max())
            status = "ok" if err <= allowed else "FAIL"
            print(f"check {name:>11} {label:<34} err {err:.2e} allowed {allowed:.2e} {status}", flush=True)
            if status != "ok":
                failures.append(f"{name}: {label}: err {err:.3e} > {allowed:.3e}")
    return failures


def time_events(fn: Callable[[], None], torch: Any, min_seconds: float = 0.05, max_reps: int = 2000
                ) -> tuple[float, float]:
    """(kernel seconds per call by CUDA events, wall seconds per call) over back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    reps = 8
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        wall = time.perf_counter() - t0
        if wall >= min_seconds or reps >= max_reps:
            return start.elapsed_time(end) / 1e3 / reps, wall / reps
        reps = min(max_reps, reps * 4)


def run(bundles: Path, trust_native_code: bool = False) -> int:
    import torch
    import torch.nn.functional as F
    import tvm
    from bitsmith.backends.tvm.cuda_runtime import gpu_available
    gpu_available()  # registers TVM's CUDA runtime under TVM_USE_RUNTIME_LIB=1
    from machine import machine_line
    if not tvm.cuda(0).exist:
        raise SystemExit("no CUDA GPU visible to TVM")
    failures = check_all(bundles, trust_native_code)
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t_copy, _ = time_events(lambda: b.copy_(a), torch, 0.2, 50)
    copy_gbps = 2 * a.numel() / t_copy / 1e9  # bytes read + written
    del a, b
    print(f"machine: {torch.cuda.get_device_name(0)}; host {machine_line()}")
    print(f"torch {torch.__version__}, TVM {tvm.__version__}; copy bandwidth {copy_gbps:.0f} GB/s measured")
    print("timing: CUDA events around back-to-back calls (kernel), and wall clock; "
          "torch = F.scaled_dot_product_attention")
    head = (f"{'config':>8} {'phase':>7} {'b':>3} {'s':>5} {'t':>5} {'torch us':>9} {'ours us':>9} {'ours wall':>9} "
            f"{'vs torch':>8} {'KV GB/s':>8} {'%copy':>6}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(1)
    for name in ("smollm2", "llama1b"):
        cfg = CONFIGS[name]
        kern = Kernel(bundles, name, trust_native_code)
        phases = (("decode", [(b, 1, t) for b, t in DECODE]), ("prefill", [(b, n, n) for b, n in PREFILL]))
        for phase, shapes in phases:
            for b, s, t in shapes:
                q, k, v, mask = _inputs(rng, cfg, b, s, t)
                call = kern.prepare(q, k, v, mask)
                tq, tk, tv = (torch.from_numpy(a).cuda() for a in (q, k, v))
                t_torch, _ = time_events(lambda: F.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=phase == "prefill", enable_gqa=True), torch)
                t_ours, wall = time_events(call, torch)
                kv_bytes = k.nbytes + v.nbytes
                gbps = kv_bytes / t_ours / 1e9
                print(f"{name:>8} {phase:>7} {b:>3} {s:>5} {t:>5} {t_torch * 1e6:9.1f} {t_ours * 1e6:9.1f} "
                      f"{wall * 1e6:9.1f} {t_torch / t_ours:8.2f} {gbps:8.0f} {100 * gbps / copy_gbps:6.1f}", flush=True)
                del tq, tk, tv
    print("vs torch = torch kernel time / ours (> 1: faster); our decode includes the combine kernel")
    print(f"correctness: {'all passed' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description="tvm-cuda attention vs torch SDPA (see module doc)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", type=Path, help="compile the kernels into this folder (needs TVM's compiler + nvcc)")
    g.add_argument("--run", type=Path, help="check and time the kernels of this folder (needs a GPU)")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--trust-native-code", action="store_true",
                    help="load kernel libraries built on another machine (the prebuilt folder you made)")
    args = ap.parse_args()
    if args.build:
        build(args.build, args.arch)
    else:
        raise SystemExit(run(args.run, args.trust_native_code))


if __name__ == "__main__":
    main()
