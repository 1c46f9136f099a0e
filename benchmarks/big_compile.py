"""Streamed compile of a LLaMA2-7B-shaped model (seeded random weights) and a decode from the artifact.

    python benchmarks/big_compile.py --layers 32 --targets tvm-llvm,lut-cpu --out /tmp/big --tokens 4

The weights come from ``bitsmith.testing.seeded_llama`` (PCG64 per tensor name), read on
demand through ``frontend.streamed_capture``: the quantize pass packs one linear at a time,
so the fp32 model (27 GB at 7B) is never in memory. Each compile and each decode runs in a
fresh process (``compile`` / ``decode`` subcommands) so that its peak RSS (VmHWM) is its own.

Printed per target: peak RSS and phase times of the compile (capture, passes, build, save),
artifact size, peak RSS of the decoding process (load + generate), decode tokens/s (greedy,
batch 1, a 4-token prompt; per-token time = (t(1 + T tokens) - t(1 token)) / T) against the
bandwidth floor: weight bytes read per token (every table tensor but the embedding, of which
one row is read) / read bandwidth measured in the decoding process just before (torch.sum
over 512 MiB, the same thread count). The machine is shared: the ``uptime`` load is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_line  # noqa: E402

SCHEME = "bitmod-w4"
PROMPT = (1, 450, 4086, 263)   # any ids below the vocab


def model_of(layers: int, seed: int) -> Any:
    """LLaMA2-7B's shape (benchmarks/fpga_llama7b.py's LLAMA2_7B) with ``layers`` layers."""
    import dataclasses

    from bitsmith.testing.llama_shape import LLAMA2_7B
    from bitsmith.testing.seeded_llama import SeededLlama
    return SeededLlama(dataclasses.replace(LLAMA2_7B, layers=layers), seed=seed, name=f"llama2-7b-shape-{layers}l")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss() -> int:
    return _status("VmHWM")


def rss() -> int:
    return _status("VmRSS")


def phase_peak() -> int:
    """VmHWM since the last call (the kernel resets it on writing 5 to clear_refs)."""
    peak = peak_rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak


def compile_one(args: argparse.Namespace) -> dict[str, Any]:
    import bitsmith
    from bitsmith.frontend.streamed_capture import capture_streamed
    model = model_of(args.layers, args.seed)
    overall = peak_rss()
    peaks: dict[str, int] = {"imports": phase_peak()}
    t0 = time.perf_counter()
    captured = capture_streamed(model.hf_config(), model.tensor, name=model.name)
    peaks["capture"] = phase_peak()
    t1 = time.perf_counter()
    phase = iter(("compile: setup", "compile: passes"))  # progress lines: "running passes", "building"

    def progress(line: str) -> None:
        print(f"  [{time.perf_counter() - t0:7.1f} s, RSS {rss() / 2**30:.2f} GiB] {line}", flush=True)
        name = next(phase, None)
        if name is not None:
            peaks[name] = phase_peak()

    cm = bitsmith.compile(captured, target=args.target, quant=SCHEME, threads=args.threads, progress=progress)
    peaks["compile: build"] = phase_peak()
    t2 = time.perf_counter()
    cm.save(args.out)
    t3 = time.perf_counter()
    peaks["save"] = phase_peak()
    rss_at = {"phase_peaks": peaks, "after_save": rss()}
    seconds = {"capture": t1 - t0, **{k: v for k, v in cm.timings["seconds"].items() if k in ("passes", "build")},
               "save": t3 - t2, "total": t3 - t0}
    files = [f for f in Path(args.out).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    native = sum(1 for f in files if f.suffix in (".so", ".dll", ".dylib"))  # kernel libraries: one per shape
    return {"target": args.target, "peak_rss": max(overall, *peaks.values()), "rss": rss_at, "seconds": seconds,
            "artifact_bytes": size, "native_libraries": native}


def weight_bytes_per_token(artifact: str) -> int:
    manifest = json.loads((Path(artifact) / "manifest.json").read_text())
    total = 0
    for t in manifest["tensors"]:
        n = int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(t["dtype"]).itemsize
        total += n // t["shape"][0] if "embed_tokens" in t["name"] else n
    return total


def read_bandwidth(threads: int) -> float:
    import torch
    torch.set_num_threads(threads)
    a = torch.ones(128 << 20)  # 512 MiB, far beyond the L3
    a.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def decode_one(args: argparse.Namespace) -> dict[str, Any]:
    import bitsmith
    bw = read_bandwidth(args.threads)
    t0 = time.perf_counter()
    cm = bitsmith.load(args.out, threads=args.threads)
    t1 = time.perf_counter()
    ids = np.array([PROMPT], np.int64)

    def run(n: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = cm.generate(ids, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t, np.asarray(out)

    one, _ = run(1)
    many, tokens = run(1 + args.tokens)
    per_token = (many - one) / args.tokens
    floor = weight_bytes_per_token(args.out) / (bw * 1e9)
    return {"target": cm.target, "peak_rss": peak_rss(), "load_s": t1 - t0, "tokens": tokens[0].tolist(),
            "per_token_s": per_token, "tok_s": 1 / per_token, "read_bw_gbs": bw,
            "weight_bytes": weight_bytes_per_token(args.out), "floor_s": floor, "threads": args.threads}


def _child(mode: str, args: argparse.Namespace, target: str, out: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, mode, "--layers", str(args.layers), "--seed", str(args.seed),
           "--target", target, "--out", out, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stdout.splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{mode} {target} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def _uptime() -> str:
    return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="all", choices=("all", "compile", "decode"))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="tvm-llvm,lut-cpu")
    p.add_argument("--target", default="tvm-llvm")
    p.add_argument("--out", default="/tmp/big_compile")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.mode == "compile":
        print(json.dumps(compile_one(args)))
        return
    if args.mode == "decode":
        print(json.dumps(decode_one(args)))
        return
    print(machine_line())
    print(f"model: LLaMA2-7B shape with {args.layers} layers, seeded fp32 weights (seed {args.seed}), {SCHEME}, "
          f"decode threads {args.threads}")
    rows = []
    for target in args.targets.split(","):
        out = f"{args.out}/{target}"
        print(f"uptime before {target}: {_uptime()}", flush=True)
        c = _child("compile", args, target, out)
        d = _child("decode", args, target, out)
        print(f"uptime after {target}: {_uptime()}", flush=True)
        rows.append((c, d))
        print(json.dumps({"compile": c, "decode": d}), flush=True)
    gib = 2 ** 30
    print("\n| target | compile peak RSS | compile s (capture / passes / build / save) | artifact | "
          "decode peak RSS | load s | decode tok/s | floor tok/s | of floor |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for c, d in rows:
        s = c["seconds"]
        print(f"| {c['target']} | {c['peak_rss'] / gib:.2f} GiB | {s['total']:.0f} ({s['capture']:.0f} / "
              f"{s['passes']:.0f} / {s['build']:.0f} / {s['save']:.0f}) | {c['artifact_bytes'] / gib:.2f} GiB | "
              f"{d['peak_rss'] / gib:.2f} GiB | {d['load_s']:.1f} | {d['tok_s']:.3f} | {1 / d['floor_s']:.3f} | "
              f"{d['floor_s'] / d['per_token_s']:.0%} |")
    d = rows[-1][1]
    print(f"\nfloor = {d['weight_bytes'] / 1e9:.2f} GB read per token / {d['read_bw_gbs']:.1f} GB/s "
          f"(torch.sum over 512 MiB, {d['threads']} thread(s), measured in the decode process)")


if __name__ == "__main__":
    main()
