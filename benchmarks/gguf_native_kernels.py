"""Per-call time of SmolLM2-135M's layer shapes at one activation row (decode), GGUF formats
run natively against what the gguf row ran before (dense float32 on the exact weights).

Rows, all in one process, alternating, the same random x:
  tvm-llvm dense fp32       the previous path for gguf-q4_1 / gguf-q8_0 (dequantized first)
  tvm-llvm gguf-q4_1 / q8_0 the CPU qlinear kernels decoding the GGUF blocks in registers
  tvm-llvm rtn-int4 g128    the fastest 4-bit tvm row for comparison
  tvm-llvm rtn-int8 g128    the default int8 lm_head of the other schemes (dense before)
  lut-cpu gguf-q4_1 / q8_0  the LUT engine with Q4_1's float offset in SCALE (int8 tables)
  lut-cpu rtn-int4 g128

Random codes and scales (timing does not depend on the values). Prints a markdown table of
median microseconds per call and the ratio over dense fp32. Usage:
  python benchmarks/gguf_native_kernels.py [--threads 1] [--repeats 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import tvm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bitsmith.ir  # noqa: E402,F401  (registers the schemes)
from bitsmith.backends.lut import native as lut_native  # noqa: E402
from bitsmith.backends.lut.codegen import generate  # noqa: E402
from bitsmith.backends.lut.decompose import decompose  # noqa: E402
from bitsmith.backends.tvm import runtime_cpu  # noqa: E402
from bitsmith.backends.tvm.matmul import compile_linear, compile_qlinear  # noqa: E402
from bitsmith.ir.code_packing import pack_codes  # noqa: E402
from bitsmith.ir.quant_grids import get_scheme  # noqa: E402
from bitsmith.ir.quantized import operand_types  # noqa: E402

from machine import machine_line  # noqa: E402

SHAPES = {"q/o 576x576": (576, 576), "k/v 576->192": (192, 576), "gate/up 576->1536": (1536, 576),
          "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}


def random_qlinear(rng, scheme: str, n: int, k: int, group_size: int):
    sc = get_scheme(scheme)
    attrs = dict(scheme=scheme, group_size=group_size, in_features=k, out_features=n, sparsity="",
                 outliers=False, bias=False)
    ops = []
    for role, t in operand_types(attrs):
        if role == "codes":
            ops.append(pack_codes(rng.integers(0, 1 << sc.bits, (n, k)).astype(np.uint8), sc.bits))
        elif role == "zeros":
            ops.append(rng.integers(0, 1 << sc.bits, t.shape).astype(np.uint8))
        else:  # scales, offsets
            ops.append((rng.uniform(0.005, 0.05, t.shape)).astype(t.dtype))
    return attrs, ops


COLD_BYTES = 96 << 20  # more than this machine's L3 (32 MiB): each call reads its weights from memory


def _bind(fn, xt, consts, yt):
    return lambda: fn(xt, *consts, yt)


def _bind_lut(lut, prog, x, threads, out):
    bound = lut.plan(prog)  # validated once, as the lut-cpu executor does
    return lambda: bound(x, lut_native.TABLES_INT8, threads, out, None)


def timed(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    runtime_cpu.set_threads(args.threads)
    rng = np.random.default_rng(0)
    isa = lut_native.choose_isa("native")
    lut = lut_native.load_library(lut_native.build_library(isa=isa), isa)
    print(f"machine: {machine_line()}; threads {args.threads}; load {os.getloadavg()[0]:.2f}")
    rows = [("tvm dense fp32", None, None), ("tvm gguf-q4_1", "gguf-q4_1", 32), ("tvm gguf-q8_0", "gguf-q8_0", 32),
            ("tvm rtn-int4 g128", "rtn-int4", 128), ("tvm rtn-int8 g128", "rtn-int8", 128),
            ("lut gguf-q4_1", "gguf-q4_1", 32), ("lut gguf-q8_0", "gguf-q8_0", 32),
            ("lut rtn-int4 g128", "rtn-int4", 128)]
    print("| shape | " + " | ".join(r[0] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        x = rng.standard_normal((1, k)).astype(np.float32)
        calls = []
        xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros((1, n), np.float32))

        def rotating(call_with, operands):
            """Calls on ``copies`` copies of the operands in turn, so the weights come from memory
            as in a decode step (one copy would stay in cache between calls)."""
            size = sum(a.nbytes for a in operands)
            copies = max(1, min(64, -(-COLD_BYTES // size)))
            held = [call_with([a.copy() for a in operands]) for _ in range(copies)]
            turn = iter(range(1 << 62))
            return lambda: held[next(turn) % copies]()

        def tvm_call(f):  # the kernel alone: operands already TVM tensors, as the executor holds them
            ops = [c.numpy() for c in f.constants]
            return rotating(lambda cs: _bind(f.function, xt, [tvm.runtime.tensor(c) for c in cs], yt), ops)

        for label, scheme, gs in rows:
            if scheme is None:
                calls.append(tvm_call(compile_linear(rng.standard_normal((n, k)).astype(np.float32))))
                continue
            attrs, ops = random_qlinear(rng, scheme, n, k, gs)
            if label.startswith("tvm"):
                calls.append(tvm_call(compile_qlinear(attrs, ops)))
            else:
                prog = generate(decompose(attrs, ops))
                out = np.zeros((1, n), np.float32)
                calls.append(rotating(lambda cs, prog=prog, out=out: _bind_lut(lut, type(prog)(
                    cs[0], cs[1], cs[2], prog.outliers, prog.in_features), x, args.threads, out),
                    [prog.stream, prog.weights, prog.params]))
        us = [[] for _ in rows]
        for _ in range(3):  # alternate the rows so load changes hit them alike
            for i, c in enumerate(calls):
                us[i].append(timed(c, args.repeats // 3))
        med = [statistics.median(u) for u in us]
        cells = [f"{m:.0f} ({med[0] / m:.2f}x)" for m in med]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"load after: {os.getloadavg()[0]:.2f}; cells: median us per call (speed-up over tvm dense fp32)")


if __name__ == "__main__":
    main()
