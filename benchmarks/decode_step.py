"""Decode speed of SmolLM2-135M with the plan's kernels called from Python vs one native call a step,
and one native call a step with the KV cache updated in place.

    python benchmarks/decode_step.py [--rows tvm-rtn-int4,tvm-bitmod-w4,lut-rtn-int4] [--threads 1,2]
                                     [--new-tokens 32] [--rounds 3] [--work DIR] [--no-profile]

Modes: "python" and "native" run ``main`` (``present = concat(past, new)``, a copy of every
cache per step), "inplace" runs the native driver on the in-place variant through a
``KVSession`` (tvm/kv_inplace.py: capacity-sized caches, each step's keys written in place).

Both executors run the same artifact, the same kernels and the same greedy loop in one process
(``python_steps`` switches the executable between them), alternating round by round so the
machine's load falls on both alike. Reported per (threads, row): decode tokens/s of each,
their ratio, the CPU time of the process per token (on a shared machine the wall clock counts
other processes' time; at 1 thread the CPU clock does not), whether the greedy tokens and every
step's logits are bit-identical, and a per-token CPU breakdown: each kernel call of the Python
path timed with the calling thread's CPU clock (a tracing profiler) and summed by kind, then
"overhead" = CPU per token minus the kernels' CPU, for each executor. Artifacts are compiled
once into --work (kept for reruns).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a")
ROWS: dict[str, tuple[str, dict]] = {
    "tvm-rtn-int4": ("tvm-llvm", {"quant": "rtn-int4"}),
    "tvm-bitmod-w4": ("tvm-llvm", {"quant": "bitmod-w4"}),
    "lut-rtn-int4": ("lut-cpu", {"quant": "rtn-int4"}),
    # issue 15's race rows short of the gguf row: where their decode step goes
    "tvm-gguf": ("tvm-llvm", {"quant": "gguf"}),
    "tvm-shiftadd-w3": ("tvm-llvm", {"quant": "shiftadd-w3"}),
    "lut-bitmod-w3": ("lut-cpu", {"quant": "bitmod-w3"}),
}


def artifact(row: str, work: Path) -> str:
    import bitsmith
    path = work / row
    if not (path / "manifest.json").exists():
        target, options = ROWS[row]
        print(f"compiling {row}...", file=sys.stderr, flush=True)
        bitsmith.compile("smollm2-135m", target=target, **options).save(str(path))
    return str(path)


def stepper(cm):
    """The object whose ``python_steps`` switches executors (the LUT target's tvm-llvm host)."""
    ex = cm.executable
    host = getattr(ex, "host", None)
    return host if hasattr(host, "executors") and hasattr(host, "python_steps") else ex


def decode(cm, ids: np.ndarray, new_tokens: int) -> tuple[list[int], list[np.ndarray], float, float]:
    """Prefill then ``new_tokens`` greedy steps; (tokens, each step's logits, decode wall seconds,
    decode CPU seconds of this process: with 1 thread, the work itself, whatever else the
    machine runs)."""
    from bitsmith.runtime.generate import empty_cache, main_args, positions
    cache = empty_cache(cm.module, 1)
    logits, *cache = cm.run("main", main_args(cm.module, ids, positions(1, 0, ids.shape[1]), cache))
    pos, tok = ids.shape[1], int(logits[0, -1].argmax())
    tokens, steps = [tok], []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        logits, *cache = cm.run("main", main_args(cm.module, np.array([[tok]]), positions(1, pos, 1), cache))
        pos += 1
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        steps.append(logits)
    return tokens, steps, time.perf_counter() - t0, time.process_time() - c0


def decode_inplace(cm, ids: np.ndarray, new_tokens: int) -> tuple[list[int], list[np.ndarray], float, float]:
    """``decode`` on the executable's in-place KV session (same prompt, steps and outputs)."""
    from bitsmith.runtime.generate import positions, round_capacity
    session = cm.executable.kv_session()
    if session is None:
        raise SystemExit("this artifact has no in-place KV variant: recompile it (delete --work)")
    s = ids.shape[1]
    session.start(1, round_capacity(s + new_tokens + 1))
    logits = session.step(ids, positions(1, 0, s), np.ones((1, s), np.int64))
    pos, tok = s, int(logits[0, -1].argmax())
    tokens, steps = [tok], []
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        logits = session.step(np.array([[tok]]), positions(1, pos, 1), np.ones((1, pos + 1), np.int64))
        pos += 1
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        steps.append(logits)
    return tokens, steps, time.perf_counter() - t0, time.process_time() - c0


def kind_of(name: str) -> str:
    for prefix, kind in (("qlinear", "quantized linear"), ("lut/", "LUT engine (qlinear)"),
                         ("linear", "dense linear (lm_head)"), ("attention", "attention"),
                         ("embedding", "embedding"), ("fused", "fused elementwise/norm/rope/kv-concat")):
        if name.startswith(prefix):
            return kind
    return "other"


def kernel_profile(cm, ids: np.ndarray, new_tokens: int) -> tuple[dict[str, float], int]:
    """Seconds per token by kernel kind, timing every call of the Python executor."""
    from bitsmith.backends.tvm.plan import Call
    from bitsmith.backends.tvm import executor as ex_mod
    st = stepper(cm)
    ex = st.executors["main"]
    py = getattr(ex, "python", ex)
    totals: dict[str, float] = defaultdict(float)
    original = list(py._steps)
    calls = [s for s in py.plan.steps if isinstance(s, Call)]
    wrapped, k = [], 0
    for step in original:
        if step[0] == ex_mod._CALL:
            kind = kind_of(calls[k].name)
            k += 1

            def timed(*a, _fn=step[1], _kind=kind):
                t = time.thread_time()  # CPU time of this thread: immune to other processes
                _fn(*a)
                totals[_kind] += time.thread_time() - t
            step = (step[0], timed, *step[2:])
        wrapped.append(step)
    st.python_steps = True
    try:
        decode(cm, ids, 1)  # buffers and prefill outside the counts
        totals.clear()
        py._steps = wrapped
        decode(cm, ids, new_tokens)
    finally:
        py._steps = original
    # the prefill of the timed run is in the totals too: measure it alone and subtract
    prefill: dict[str, float] = defaultdict(float)
    py._steps = wrapped
    saved = dict(totals)
    totals.clear()
    try:
        decode(cm, ids, 0)
    finally:
        py._steps = original
    prefill = dict(totals)
    per_token = {kd: (saved.get(kd, 0.0) - prefill.get(kd, 0.0)) / new_tokens for kd in saved}
    return per_token, len(calls)


def native_python_side(cm, ids: np.ndarray, new_tokens: int) -> float | None:
    """CPU seconds per token of the native executor's Python part (argument binding, shape table,
    buffers, result arrays): the same loop with the driver's C call replaced by a no-op."""
    st = stepper(cm)
    ex = st.executors["main"]
    driver = getattr(ex, "driver", None)
    if driver is None:
        return None
    from bitsmith.runtime.generate import empty_cache, main_args, positions
    st.python_steps = False
    cache = empty_cache(cm.module, 1)
    logits, *cache = cm.run("main", main_args(cm.module, ids, positions(1, 0, ids.shape[1]), cache))
    real = driver.run
    driver.run = lambda *a: 0
    try:
        pos, c0 = ids.shape[1], time.process_time()
        for _ in range(new_tokens):
            _, *cache = cm.run("main", main_args(cm.module, np.array([[1]]), positions(1, pos, 1), cache))
            pos += 1
        return (time.process_time() - c0) / new_tokens
    finally:
        driver.run = real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bitsmith-decode-step"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kind kernel profile (long runs)")
    ap.add_argument("--modes", default="python,native,inplace", help="which of python,native,inplace to time")
    a = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from machine import machine_line

    import bitsmith
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for r in a.rows.split(",") if r]
    modes = [m for m in ("python", "native", "inplace") if m in a.modes.split(",")]
    paths = {r: artifact(r, work) for r in rows}
    results = []
    load_before = os.getloadavg()
    for threads in [int(t) for t in a.threads.split(",")]:
        for row in rows:
            cm = bitsmith.load(paths[row], threads=threads)
            ids = np.asarray([cm.tokenizer().encode(PROMPT).ids], dtype=np.int64)
            st = stepper(cm)
            times = {"python": [], "native": [], "inplace": []}
            cpu = {"python": [], "native": [], "inplace": []}
            outs = {}
            for _ in range(a.rounds):
                for mode in modes:
                    st.python_steps = mode == "python"
                    run = decode_inplace if mode == "inplace" else decode
                    tokens, logits, secs, cpu_secs = run(cm, ids, a.new_tokens)
                    times[mode].append(secs)
                    cpu[mode].append(cpu_secs)
                    outs[mode] = (tokens, logits)
            st.python_steps = False
            def equal(m):  # tokens and every step's logits of mode m against the native concat path
                if m not in outs or "native" not in outs:
                    return None
                return outs[m][0] == outs["native"][0] and all(np.array_equal(x, y)
                                                               for x, y in zip(outs[m][1], outs["native"][1]))
            same_tokens = None if "python" not in outs or "native" not in outs else outs["python"][0] == outs["native"][0]
            same_logits, inplace_same = equal("python"), equal("inplace")
            if a.no_profile:
                kernels, calls, py_side = {}, None, None
            else:
                kernels, calls = kernel_profile(cm, ids, a.new_tokens)
                py_side = native_python_side(cm, ids, a.new_tokens)
            best = {m: min(v) / a.new_tokens for m, v in times.items() if v}
            best_cpu = {m: min(v) / a.new_tokens for m, v in cpu.items() if v}
            res = {"threads": threads, "row": row, "calls_per_token": calls,
                   "tok_s": {m: 1.0 / s for m, s in best.items()},
                   "ms_per_token": {m: 1e3 * s for m, s in best.items()},
                   "cpu_ms_per_token": {m: 1e3 * s for m, s in best_cpu.items()},
                   "kernels_cpu_ms": {k: 1e3 * v for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])},
                   "same_tokens": same_tokens, "same_logits": same_logits, "inplace_bit_equal": inplace_same,
                   "native_python_side_cpu_ms": None if py_side is None else 1e3 * py_side}
            ksum = sum(res["kernels_cpu_ms"].values())
            # at 1 thread every kernel runs on this thread: CPU per token minus kernels' CPU = overhead
            res["overhead_cpu_ms"] = {m: res["cpu_ms_per_token"][m] - ksum for m in best}
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    print(f"# SmolLM2-135M decode: Python-driven kernels vs one native call per step vs that with the KV cache in place "
          f"({a.new_tokens} tokens x {a.rounds} alternating rounds, best round; one process)")
    print(f"machine: {machine_line()}; load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}")
    print()
    if "python" in modes:
        print("Wall clock (what a user sees; shared, loaded machine) and CPU time of this process per token "
              "(at 1 thread the work itself: time other processes take is not counted).")
        print()
        print("| threads | row | kernel calls/token | python tok/s | native tok/s | speed-up (wall) | python CPU ms/token "
              "| native CPU ms/token | CPU saved ms/token | tokens equal | logits bit-equal |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results if "python" in modes else []:
        c = r["cpu_ms_per_token"]
        print(f"| {r['threads']} | {r['row']} | {r['calls_per_token']} | {r['tok_s']['python']:.1f} | "
              f"{r['tok_s']['native']:.1f} | {r['tok_s']['native'] / r['tok_s']['python']:.2f}x | "
              f"{c['python']:.2f} | {c['native']:.2f} | {c['python'] - c['native']:.2f} | "
              f"{'yes' if r['same_tokens'] else 'NO'} | {'yes' if r['same_logits'] else 'NO'} |")
    print()
    print("KV cache in place (native driver on the in-place variant, one KVSession per round) against the "
          "native concat path (same rounds, same process):")
    print()
    print("| threads | row | native tok/s | in-place tok/s | speed-up (wall) | native CPU ms/token | in-place CPU "
          "ms/token | CPU saved ms/token | tokens and logits bit-equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results if "inplace" in modes else []:
        c, t = r["cpu_ms_per_token"], r["tok_s"]
        print(f"| {r['threads']} | {r['row']} | {t['native']:.1f} | {t['inplace']:.1f} | "
              f"{t['inplace'] / t['native']:.2f}x | {c['native']:.2f} | {c['inplace']:.2f} | "
              f"{c['native'] - c['inplace']:.2f} | {'yes' if r['inplace_bit_equal'] else 'NO'} |")
    print()
    if a.no_profile:
        results_profiled = []
    else:
        results_profiled = results
    if results_profiled:
        print("Per-token CPU breakdown (ms): every kernel call of the Python path timed with the calling thread's "
              "CPU clock, summed by kind; overhead = CPU per token minus the kernels' CPU. Exact at 1 thread; at 2 "
              "threads kernels run partly on TVM's pool thread (not counted on this thread) and idle pool threads "
              "spin, so the 2-thread split is indicative only.")
        print()
    for r in results_profiled:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["kernels_cpu_ms"].items())
        o = r["overhead_cpu_ms"]
        print(f"- {r['threads']} thread(s), {r['row']}: {parts}; kernels {sum(r['kernels_cpu_ms'].values()):.2f}; "
              f"overhead python {o['python']:.2f}, native {o['native']:.2f}; native executor's Python part "
              f"alone {r['native_python_side_cpu_ms']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine_line(), "load": [load_before, load_after],
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
