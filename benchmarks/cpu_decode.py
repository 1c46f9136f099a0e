"""Greedy decode speed of SmolLM2-135M on the CPU: torch eager vs bitsmith's CPU targets.

    python benchmarks/cpu_decode.py [--new-tokens 64] [--threads 1,2] [--rows eager,tvm-fp32,...]

Baseline: a bare torch eager loop over the transformers model (fp32) with its KV cache
(DynamicCache), one token per step, under torch.inference_mode. Ours: the compiled artifact
(``bitsmith.load``) running the same greedy loop through ``main`` with the KV cache. Each
(thread count, row) runs in a fresh process (TVM and OpenMP fix their pools at first use, and
one row's idle pool threads must not slow the next). Reported: decode tokens/s over the new tokens (prefill of
the prompt excluded and reported apart), the ratio to eager, and whether the greedy tokens
equal eager's. Compile time: each compiled row is compiled twice in fresh processes sharing
a kernel cache of its own, empty at first: "cold" (empty cache) and "warm" (cache filled by the
cold run); no row's cold compile sees another row's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a")

# row name -> (target, compile options); "eager" is the torch baseline
ROWS: dict[str, tuple[str, dict]] = {
    "tvm-fp32": ("tvm-llvm", {}),
    "tvm-bitmod-w4": ("tvm-llvm", {"quant": "bitmod-w4"}),
    "lut-bitmod-w4": ("lut-cpu", {"quant": "bitmod-w4"}),
    "lut-rtn-int4": ("lut-cpu", {"quant": "rtn-int4"}),
    # ShiftAddLLM pow2 BCQ: planes decoded by the generic (scalar) tvm-llvm schedule, see docs/shiftadd.md
    "tvm-shiftadd-w3": ("tvm-llvm", {"quant": "shiftadd-w3"}),
    # the same planes on the LUT engine (BCQMUL/BCQACC, docs/lut-isa.md "Binary-coded planes")
    "lut-shiftadd-w3": ("lut-cpu", {"quant": "shiftadd-w3"}),
}


def _thread_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def _worker(args: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"worker {args} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- workers (fresh processes)

def compile_worker(row: str, out_dir: str) -> dict:
    import bitsmith
    target, options = ROWS[row]
    t0 = time.perf_counter()
    cm = bitsmith.compile("smollm2-135m", target=target, **options)
    total = time.perf_counter() - t0
    cm.save(out_dir)
    rep = cm.report()
    ex = rep.get("executable", {})
    return {"row": row, "total_s": total, "build_s": rep["compile_seconds"].get("build"),
            "capture_s": rep["compile_seconds"].get("capture"), "passes_s": rep["compile_seconds"].get("passes"),
            "cache_hits": ex.get("cache_hits", ex.get("host_cache_hits")),
            "cache_misses": ex.get("cache_misses", ex.get("host_cache_misses")),
            "bits_per_weight": rep["bits_per_weight"]}


def _time_loop(step, first_ids, new_tokens: int) -> tuple[list[int], float, float]:
    """Runs prefill + ``new_tokens`` greedy decode steps; returns (tokens, prefill s, decode s)."""
    t0 = time.perf_counter()
    nxt = step(first_ids, prefill=True)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        nxt = step(nxt, prefill=False)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return tokens, t1 - t0, t2 - t1


def eager_worker(threads: int, new_tokens: int) -> dict:
    import torch
    from transformers import DynamicCache

    from bitsmith.frontend.models import load_pretrained
    if threads:
        torch.set_num_threads(threads)
    model, tok = load_pretrained("smollm2-135m")
    model.train(False)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    state = {}

    def step(x, prefill):
        with torch.inference_mode():
            if prefill:
                state["cache"] = DynamicCache()
                inp = x
            else:
                inp = torch.tensor([[x]])
            out = model(input_ids=inp, past_key_values=state["cache"], use_cache=True)
            state["cache"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

    step(ids, prefill=True)  # warm-up
    tokens, pre, dec = _time_loop(step, ids, new_tokens)
    return {"row": "eager", "prompt_tokens": int(ids.shape[1]), "tokens": tokens, "prefill_s": pre, "decode_s": dec}


def compiled_worker(row: str, artifact: str, new_tokens: int) -> dict:
    import numpy as np

    import bitsmith
    from bitsmith.runtime.generate import empty_cache, positions
    cm = bitsmith.load(artifact)
    ids = np.asarray([cm.tokenizer().encode(PROMPT).ids], dtype=np.int64)
    state = {}

    def step(x, prefill):
        if prefill:
            state["cache"], state["pos"] = empty_cache(cm.module, 1), 0
            inp = x
        else:
            inp = np.asarray([[x]], dtype=np.int64)
        logits, *state["cache"] = cm.run("main", [inp, positions(1, state["pos"], inp.shape[1]), *state["cache"]])
        state["pos"] += inp.shape[1]
        return int(logits[0, -1].argmax())

    step(ids, prefill=True)  # warm-up
    tokens, pre, dec = _time_loop(step, ids, new_tokens)
    ex = cm.report().get("executable", {})
    return {"row": row, "prompt_tokens": int(ids.shape[1]), "tokens": tokens, "prefill_s": pre, "decode_s": dec,
            "executor": ex.get("executor") + (f"; host {ex['host']}" if "host" in ex else "")}


def decode_worker(threads: int, new_tokens: int, rows: list[str], artifacts: dict[str, str]) -> dict:
    results = [eager_worker(threads, new_tokens)] if "eager" in rows else []
    for row in rows:
        if row != "eager":
            results.append(compiled_worker(row, artifacts[row], new_tokens))
    return {"threads": threads, "results": results}


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="eager," + ",".join(ROWS))
    ap.add_argument("--work", default=None, help="folder for artifacts and the kernel cache (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--compile-phases", default="cold,warm",
                    help="compiles per row: 'cold,warm' (default) or 'cold' (one compile, e.g. for slow quantizers)")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_payload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._worker:
        p = json.loads(a._payload)
        if a._worker == "compile":
            res = compile_worker(p["row"], p["out"])
        else:
            res = decode_worker(p["threads"], p["new_tokens"], p["rows"], p["artifacts"])
        print(json.dumps(res))
        return

    sys.path.insert(0, str(HERE))
    from machine import machine_line

    rows = [r for r in a.rows.split(",") if r]
    unknown = [r for r in rows if r != "eager" and r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: eager, {', '.join(ROWS)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bitsmith-cpu-decode-"))
    env = _thread_env(None)
    env["BITSMITH_CACHE_DIR"] = str(work / "cache")

    compiles, artifacts = [], {}
    for row in rows:
        if row == "eager":
            continue
        artifacts[row] = str(work / row)
        row_env = {**env, "BITSMITH_CACHE_DIR": str(work / "cache" / row)}  # cold means empty
        for phase in [p for p in a.compile_phases.split(",") if p]:
            print(f"compiling {row} ({phase})...", file=sys.stderr, flush=True)
            res = _worker(["--_worker", "compile", "--_payload", json.dumps({"row": row, "out": artifacts[row]})],
                          row_env)
            compiles.append({**res, "phase": phase})

    runs = []
    for t in [int(x) for x in a.threads.split(",")]:
        print(f"decoding with {t} thread(s)...", file=sys.stderr, flush=True)
        tenv = _thread_env(t)
        tenv["BITSMITH_CACHE_DIR"] = env["BITSMITH_CACHE_DIR"]
        results = []
        for row in rows:  # a fresh process per row: no thread pool or cache state carries over
            payload = {"threads": t, "new_tokens": a.new_tokens, "rows": [row], "artifacts": artifacts}
            results += _worker(["--_worker", "decode", "--_payload", json.dumps(payload)], tenv)["results"]
        runs.append({"threads": t, "results": results})

    print(f"# SmolLM2-135M greedy decode, {a.new_tokens} new tokens after a {PROMPT!r} prompt")
    print(f"machine: {machine_line()}")
    print()
    print("| threads | row | executor | prefill ms | decode tok/s | vs eager | tokens equal eager |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        base = next((r for r in run["results"] if r["row"] == "eager"), None)
        for r in run["results"]:
            tps = (a.new_tokens - 1) / r["decode_s"]
            ratio = tps / ((a.new_tokens - 1) / base["decode_s"]) if base else float("nan")
            quantized = r["row"] in ROWS and "quant" in ROWS[r["row"]][1]
            same = "—" if base is None or r is base else "n/a (quantized)" if quantized else (
                "yes" if r["tokens"] == base["tokens"] else
                f"first {next((i for i, (x, y) in enumerate(zip(r['tokens'], base['tokens'])) if x != y), 0)}")
            print(f"| {run['threads']} | {r['row']} | {r.get('executor') or 'torch eager'} | "
                  f"{r['prefill_s'] * 1e3:.0f} | {tps:.1f} | {ratio:.2f}x | {same} |")
    print()
    print("| row | compile | total s | capture s | passes s | build s | cache hits/misses | bits/weight |")
    print("|---|---|---|---|---|---|---|---|")
    for c in compiles:
        print(f"| {c['row']} | {c['phase']} | {c['total_s']:.1f} | {c['capture_s']:.1f} | {c['passes_s']:.1f} | "
              f"{c['build_s']:.1f} | {c['cache_hits']}/{c['cache_misses']} | {c['bits_per_weight']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine_line(), "runs": runs, "compiles": compiles}, indent=1))


if __name__ == "__main__":
    main()
