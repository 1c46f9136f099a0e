"""Micro-benchmark: tvm-llvm dense and quantized GEMV/GEMM kernels vs torch fp32 dense.

    python benchmarks/tvm_matmul.py                 # both thread counts, each in a fresh process
    python benchmarks/tvm_matmul.py --threads 1 --shapes 4096x4096 --schemes bitmod-w4
    python benchmarks/tvm_matmul.py --cold     # weights rotated through > 64 MiB: read from DRAM, as in decode
    python benchmarks/tvm_matmul.py --bcq      # bcq_linear (shiftadd) vs qlinear of the same bits, m = 1, 1 thread

``--bcq``: the binary-coded ``bcq_linear`` kernel (pow2 scales, w2/w3/w4, w3 also with offsets)
beside the rtn-int/bitmod qlinear kernels of the same width, at decode (m = 1), 1 thread, timed
in process CPU time (robust on a shared machine); prints ms per call, the ratio to rtn-int of the
same bits, the machine and the load average before and after (results: benchmarks/results/tvm_bcq.md).

Prints one table per thread count: shape, m, torch fp32 ms, tvm ms and GB/s (bytes of the
weight operands the kernel reads: fp32 weights, or codes + scales + metadata), speed-up over torch.
Weights are random codes/scales in the IR's packed format (speed does not depend on values).
The machine is shared and noisy: torch and tvm are timed alternately in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

SHAPES = ["576x576", "576x192", "576x1536", "1536x576", "576x49152", "4096x4096"]  # in x out


CLOCK = time.perf_counter


def _bench(fn, min_time: float = 0.2, repeats: int = 5) -> float:
    fn()
    t0, calls = CLOCK(), 0
    while CLOCK() - t0 < min_time / 4 or calls < 3:
        fn()
        calls += 1
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        for _ in range(calls):
            fn()
        best = min(best, (CLOCK() - t) / calls)
    return best


def _random_qlinear(scheme_name: str, k: int, n: int, group_size: int, rng):
    import numpy as np
    from bitsmith.ir.quant_grids import get_scheme
    from bitsmith.ir.code_packing import group_count, pack_codes
    scheme = get_scheme(scheme_name)
    groups = group_count(k, group_size)
    arrays = [pack_codes(rng.integers(0, len(scheme.candidates[0].values), (n, k)), scheme.bits),
              (rng.random((n, groups)) * 0.02 + 0.001).astype(np.float16)]
    if scheme.asymmetric:
        arrays.append(rng.integers(0, 1 << scheme.bits, (n, groups)).astype(np.uint8))
    if scheme.selector_bits:
        arrays.append(pack_codes(rng.integers(0, len(scheme.candidates), (n, groups)), scheme.selector_bits))
    attrs = dict(scheme=scheme_name, group_size=group_size, in_features=k, out_features=n,
                 sparsity="", outliers=0, bias=False)
    return attrs, arrays


def _random_bcq(k: int, n: int, bits: int, group_size: int, offset: bool, rng):
    """bcq_linear attrs and constants (planes, pow2 exponents, [offsets]) shaped like a greedy fit's:
    plane i about 2**-i of plane 0, offsets odd with |c| < 2**bits."""
    import numpy as np
    from bitsmith.ir.bcq import pack_planes
    from bitsmith.ir.code_packing import group_count
    groups = group_count(k, group_size)
    e = rng.integers(-9, -5, (1, n, groups)) - np.arange(bits)[:, None, None] - rng.integers(0, 2, (bits, n, groups))
    arrays = [pack_planes(rng.choice(np.array([-1, 1], np.int8), (bits, n, k))), e.astype(np.int8)]
    if offset:
        arrays.append((2 * rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, groups)) + 1).astype(np.int8))
    attrs = dict(bits=bits, group_size=group_size, in_features=k, out_features=n, scale="pow2", bias=False,
                 offset=offset)
    return attrs, arrays


BCQ_ROWS = (("shiftadd-w2", 2, False, "rtn-int2"), ("shiftadd-w3", 3, False, "rtn-int3"),
            ("shiftadd-w3-offset", 3, True, "rtn-int3"), ("shiftadd-w4", 4, False, "rtn-int4"))
BCQ_SHAPES = ["4096x4096", "576x576", "576x1536", "1536x576"]  # in x out


def _cpu_per_call(fn, min_time: float = 0.3, repeats: int = 5) -> float:
    """Best over ``repeats`` of the mean process CPU time per call (1 thread: what the call costs,
    whatever else the machine runs)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, c0 = 0, time.process_time()
        while time.process_time() - c0 < min_time or calls < 3:
            fn()
            calls += 1
        best = min(best, (time.process_time() - c0) / calls)
    return best


def run_bcq(shapes: list[str], group_size: int) -> None:
    """bcq_linear pow2 vs qlinear of the same bits at m = 1, 1 thread, CPU time per call."""
    os.environ["TVM_NUM_THREADS"] = "1"
    import numpy as np
    import tvm
    from bitsmith.backends.tvm.bcq import compile_bcq
    from bitsmith.backends.tvm.matmul import compile_qlinear, qlinear_operands
    from machine import machine_line
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()
    print(f"\n## bcq_linear vs qlinear, m = 1, 1 thread, group {group_size}, process CPU time per call, "
          f"weights hot\nmachine: {machine_line()}; load average before {load0[0]:.2f} {load0[1]:.2f}")
    print("| shape (in x out) | kernel | ms / call | GB/s | vs rtn-int same bits |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32))
        y = tvm.runtime.tensor(np.empty((1, n), np.float32))
        base: dict[str, float] = {}
        qnames = sorted({q for *_, q in BCQ_ROWS} | {"bitmod-w3", "bitmod-w4"})
        kernels = []
        for name in qnames:
            attrs, arrays = _random_qlinear(name, k, n, group_size, rng)
            ops = qlinear_operands(attrs, arrays, "float32")
            kernels.append((name, compile_qlinear(attrs, arrays), ops, None))
        for label, bits, offset, vs in BCQ_ROWS:
            attrs, arrays = _random_bcq(k, n, bits, group_size, offset, rng)
            kernels.append((label, compile_bcq(attrs, arrays), arrays, vs))
        for label, fn, ops, vs in kernels:
            consts = [tvm.runtime.tensor(a) for a in ops]
            t = _cpu_per_call(lambda: fn.function(x, *consts, y))
            base.setdefault(label, t)
            ratio = f"{t / base[vs]:.2f}x" if vs else ""
            print(f"| {shape} | {label} | {t * 1e3:.4f} | {sum(a.nbytes for a in ops) / t / 1e9:.1f} | {ratio} |",
                  flush=True)
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f}")


def _copies(nbytes: int, cold: bool) -> int:
    """How many copies of a weight to rotate through so every call reads it from DRAM (> 64 MiB
    in all, twice a 32 MiB L3) when ``cold``; 1 (weights stay in cache) otherwise."""
    return max(1, -(-(64 << 20) // nbytes)) if cold else 1


def run(threads: int, shapes: list[str], schemes: list[str], ms: list[int], group_size: int,
        cold: bool = False) -> None:
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch
    from bitsmith.backends.tvm.matmul import compile_linear, compile_qlinear, qlinear_operands
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"\n## threads={threads}, {'cold (weights from DRAM)' if cold else 'hot (weights in cache)'}, {clock}  "
          f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("| shape (in x out) | kernel | m | torch fp32 ms | tvm ms | tvm GB/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        k, n = (int(v) for v in shape.split("x"))
        import tvm
        w = rng.standard_normal((n, k)).astype(np.float32)
        wts = [torch.from_numpy(w.copy()) for _ in range(_copies(w.nbytes, cold))]
        dense = compile_linear(w)
        kernels = [("fp32 dense", dense, [[tvm.runtime.tensor(t.numpy())] for t in wts], w.nbytes)]
        for name in schemes:
            attrs, arrays = _random_qlinear(name, k, n, group_size, rng)
            ops = qlinear_operands(attrs, arrays, "float32")
            nbytes = sum(a.nbytes for a in ops)
            consts = [[tvm.runtime.tensor(a) for a in ops] for _ in range(_copies(nbytes, cold))]
            kernels.append((name, compile_qlinear(attrs, arrays), consts, nbytes))
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            xt = torch.from_numpy(x)
            for label, fn, consts, nbytes in kernels:
                xs = tvm.runtime.tensor(x)
                y = tvm.runtime.tensor(np.empty((m, n), np.float32))

                def torch_round():
                    for wt in wts:
                        torch.nn.functional.linear(xt, wt)

                def tvm_round():
                    for c in consts:
                        fn.function(xs, *c, y)

                t_torch = _bench(torch_round) / len(wts)
                t_tvm = _bench(tvm_round) / len(consts)
                t_torch = min(t_torch, _bench(torch_round) / len(wts))
                print(f"| {shape} | {label} | {m} | {t_torch * 1e3:.3f} | {t_tvm * 1e3:.3f} | "
                      f"{nbytes / t_tvm / 1e9:.1f} | {t_torch / t_tvm:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    p.add_argument("--shapes", nargs="*", default=SHAPES)
    p.add_argument("--schemes", nargs="*", default=["rtn-int4", "bitmod-w4", "bitmod-w3"])
    p.add_argument("--m", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--cold", action="store_true", help="rotate weight copies (> 64 MiB) so reads come from DRAM")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the calling thread's CPU time (1 thread only: robust on a shared machine)")
    p.add_argument("--bcq", action="store_true",
                   help="bcq_linear (shiftadd pow2) vs qlinear of the same bits, m = 1, 1 thread, CPU time")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.bcq:
        run_bcq(a.shapes if a.shapes != SHAPES else BCQ_SHAPES, a.group_size)
        return
    if a.cpu_time:
        if a.threads != [1]:
            p.error("--cpu-time needs --threads 1 (other threads' time is not counted)")
        global CLOCK
        CLOCK = time.thread_time
    if a.child or len(a.threads) == 1:
        run(a.threads[0], a.shapes, a.schemes, a.m, a.group_size, a.cold)
        return
    for t in a.threads:  # TVM reads TVM_NUM_THREADS once per process: one process per count
        subprocess.run([sys.executable, __file__, "--child", "--threads", str(t), "--shapes", *a.shapes,
                        "--schemes", *a.schemes, "--m", *map(str, a.m), "--group-size", str(a.group_size),
                        *(["--cold"] if a.cold else [])],
                       check=True)


if __name__ == "__main__":
    main()
