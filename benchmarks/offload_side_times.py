"""Measured per-token time of each side of an attention-offloaded decode step on this machine,
next to the cost model's prediction (cpu-server preset, float32 as the IR is).

The module is SmolLM2-135M captured by the frontend, with ``partition{pattern=attention_kv}``.
It runs on the reference interpreter with float32 numpy kernels for linear/matmul/attention
(the interpreter's own rules widen to float64, which would time a conversion, not the model);
the time inside the attention calls is the attention side, the rest the dense side.
Usage: python benchmarks/offload_side_times.py [--model smollm2-135m]
       [--out benchmarks/results/offload_measured_planner.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# one BLAS thread, so that process CPU time (the clock below) equals the time the code runs
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402

from bitsmith.ir.interpreter import RULES, run_function  # noqa: E402
from bitsmith.offload_planning.presets import builtin_presets  # noqa: E402
from bitsmith.offload_planning.probe import matmul_flops, read_bandwidth  # noqa: E402
from bitsmith.ir import symbolic as sym  # noqa: E402
from bitsmith.offload_planning.profile import attention_functions, decode_bindings, decode_profile  # noqa: E402
from bitsmith.offload_planning.roofline import AS_IR, function_costs  # noqa: E402
from bitsmith.offload_planning.sources import load_model  # noqa: E402


def _f32_attention(xs, node, ctx):
    q, k, v = xs
    b, hq, s, d = q.shape
    hk = k.shape[1]
    scores = np.matmul(q.reshape(b, hk, hq // hk * s, d) * np.float32(node.attr("scale")), np.swapaxes(k, -1, -2))
    scores -= scores.max(axis=-1, keepdims=True)  # decode: s = 1, every key is visible
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return [np.matmul(scores, v).reshape(b, hq, s, v.shape[-1])]


def _f32_linear(xs, node, ctx):
    x, w = xs[0], xs[1]
    # one 2-D product: a stacked [b, s, k] @ W.T loops over b in numpy and reads W b times
    y = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(x.shape[:-1] + (w.shape[0],))
    return [y + xs[2] if len(xs) == 3 else y]


F32 = {"linear": _f32_linear,
       "matmul": lambda xs, node, ctx: [xs[0] @ xs[1]],
       "attention": _f32_attention}


# CPU time of this process: the machine is shared (load average ~18 on 2 cores while this was
# written), and wall time would measure the other jobs; memory-bandwidth contention remains
CLOCK = time.process_time


def measure(module, batch: int, context: int, repeats: int) -> tuple[float, float, dict[str, float]]:
    """Median seconds of (dense, attention) per decode step, and of each op kind inside the
    attention calls (the cache append by ``concat`` and the ``attention`` op)."""
    fn = module.function("main")
    rng = np.random.default_rng(0)
    args = []
    for p in fn.params:
        shape = tuple(batch if d == "batch" else 1 if d == "seq" else context if d == "past" else d
                      for d in p.type.shape)
        args.append(np.full(shape, context, np.int64) if p.type.dtype == "int64"
                    else rng.standard_normal(shape).astype(np.float32))
    in_calls = [0.0]

    def timed_call(xs, node, ctx):
        t = CLOCK()
        out = RULES["call"](xs, node, ctx)
        in_calls[0] += CLOCK() - t
        return out

    per_op: dict[str, float] = {}

    def timed(op, impl):
        def run(xs, node, ctx):
            t = CLOCK()
            out = impl(xs, node, ctx)
            per_op[op] = per_op.get(op, 0.0) + CLOCK() - t
            return out
        return run

    # concat and attention occur only inside the attention calls of this module (rope's concat
    # sits in the dense side, so concat is timed only while a call runs)
    inside = [False]

    def call_flag(xs, node, ctx):
        inside[0] = True
        try:
            return timed_call(xs, node, ctx)
        finally:
            inside[0] = False

    concat = timed("concat", RULES["concat"])
    overrides = {**F32, "call": call_flag, "attention": timed("attention", F32["attention"]),
                 "concat": lambda xs, node, ctx: (concat if inside[0] else RULES["concat"])(xs, node, ctx)}
    dense, attention = [], []
    ops: dict[str, list[float]] = {}
    for i in range(repeats + 1):
        in_calls[0] = 0.0
        per_op.clear()
        t = CLOCK()
        run_function(module, "main", args, overrides=overrides)
        total = CLOCK() - t
        if i:  # the first run warms caches and allocators
            dense.append(total - in_calls[0])
            attention.append(in_calls[0])
            for op, t in per_op.items():
                ops.setdefault(op, []).append(t)
    return statistics.median(dense), statistics.median(attention), {k: statistics.median(v) for k, v in ops.items()}


def predicted_by_op(module, bindings, peak: float, bandwidth: float) -> dict[str, float]:
    """Roofline seconds of each op kind inside the attention functions."""
    out: dict[str, float] = {}
    for fn in module.functions:
        if fn.name in attention_functions(module):
            for c in function_costs(fn, AS_IR):
                t = max(sym.evaluate(c.flops, bindings) / peak, sym.evaluate(c.bytes, bindings) / bandwidth)
                out[c.op] = out.get(c.op, 0.0) + t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--context", default="256,2048")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/offload_measured_planner.json")
    a = ap.parse_args()
    name, module = load_model(a.model, progress=lambda m: print(m, file=sys.stderr))
    prof = decode_profile(module, AS_IR, name)
    cpu = builtin_presets().device("cpu-server")
    rows = []
    for batch in (int(x) for x in a.batch.split(",")):
        for context in (int(x) for x in a.context.split(",")):
            # this machine is shared: probe it right before and after, and predict with the mean too
            before = (matmul_flops(repeats=3, clock=CLOCK), read_bandwidth(repeats=3, clock=CLOCK))
            dense, attention, ops = measure(module, batch, context, a.repeats)
            after = (matmul_flops(repeats=3, clock=CLOCK), read_bandwidth(repeats=3, clock=CLOCK))
            flops, bw = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
            b = decode_bindings(batch, context)
            row = {"batch": batch, "context": context,
                   "measured_dense_ms": dense * 1e3, "measured_attention_ms": attention * 1e3,
                   "predicted_dense_ms": prof.dense.seconds(b, cpu.peak_flops, cpu.memory_bandwidth) * 1e3,
                   "predicted_attention_ms": prof.attention.seconds(b, cpu.peak_flops, cpu.memory_bandwidth) * 1e3,
                   "probe_gflops": flops / 1e9, "probe_gbps": bw / 1e9,
                   "calibrated_dense_ms": prof.dense.seconds(b, flops, bw) * 1e3,
                   "calibrated_attention_ms": prof.attention.seconds(b, flops, bw) * 1e3,
                   "measured_append_ms": ops.get("concat", 0.0) * 1e3,
                   "measured_attention_op_ms": ops.get("attention", 0.0) * 1e3,
                   **{f"calibrated_op_{k}_ms": v * 1e3 for k, v in predicted_by_op(module, b, flops, bw).items()},
                   "bytes_per_token": sum(prof.transfer_bytes(decode_bindings(1, context)))}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = {"model": name, "machine": machine_line(), "layers": prof.layers, "dense_ops": prof.dense.ops,
           "attention_ops": prof.attention.ops, "preset": "cpu-server", "dtype": "float32",
           "executor": "reference interpreter with float32 numpy linear/matmul/attention",
           "clock": "process CPU time, 1 BLAS thread", "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
