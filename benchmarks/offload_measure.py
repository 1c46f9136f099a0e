"""Attention offloading on this machine: per decode step, the time of the dense side, of the
attention side and of the transfer over loopback, with staggering off and on (batch >= 2).

    python benchmarks/offload_measure.py DIR [--batch 2] [--new-tokens 32] [--workers 1,2] \
        [--json benchmarks/results/offload_measured.json]

DIR is an artifact compiled with ``--offload-attention``. Each configuration runs rank 0 in a
fresh process that starts its own workers (``load_offloaded(..., attention_workers=N)``, the
path ``bitsmith run --attention-workers N`` takes); workers 0 is the single-process baseline in
the same run. Figures over the decode steps only (the prompt's prefill excluded):
  dense ms/step      rank 0 running the dense segments (embedding .. lm_head)
  attention ms/step  the slowest worker running its attention program (KV append + attention)
  wait ms/step       rank 0 blocked on attention results
  submit ms/step     rank 0 slicing, packing and posting sends (gloo isend) and receives
  transfer ms/step   step - dense - attention, staggering off: everything on the critical path
                     that is not computing (the link, gloo, process wake-ups)
  ping-pong ms/step  baseline in the same run: a bare torch.distributed (gloo) exchange of the
                     same per-layer message sizes, once per layer, between two processes
  step ms            wall time of one decode step; tokens/s = batch / step
  bytes/step         tensor payload rank 0 sent / received, counted at the send/recv calls,
                     and the pass's prediction (offload_attention: send_bytes / recv_bytes)
A step makes one token per sequence (``batch`` tokens); "per token" divides by the batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
          "must be in want of a")
PROMPT_B = "The capital of France is Paris, and the capital of Italy is"


def rank0(path: str, workers: int, stagger: bool, batch: int, new_tokens: int, threads: int | None = None) -> dict:
    """Runs in the child process: generate greedily, return the engine's figures."""
    import numpy as np

    from bitsmith.runtime.offload.launch import load_offloaded
    model = load_offloaded(path, attention_workers=workers, stagger=stagger, timeout=120.0, threads=threads)
    tok = model.tokenizer()
    rows = [tok.encode(t, add_special_tokens=False).ids for t in (PROMPT, PROMPT_B)]
    n = min(len(r) for r in rows)
    ids = np.asarray([rows[i % 2][:n] for i in range(batch)], dtype=np.int64)
    model.generate(ids[:, :4], 1)  # warm-up (one prefill forward): first-call costs (kernel loading, connections) out of the figures
    model.engine.stats = type(model.engine.stats)()
    t = time.perf_counter()
    out = np.asarray(model.generate(ids, new_tokens))
    wall = time.perf_counter() - t
    stats = model.close()
    sent, received = model.schedule.predicted_bytes(batch, 1)
    return {"stats": stats, "tokens": out[:, n:].tolist(), "prompt_tokens": n, "wall_s": wall,
            "predicted_bytes_per_step": {"sent": sent, "received": received}}


def pingpong(send: int, receive: int, layers: int, steps: int) -> None:
    """Child of ``measure_pingpong``: rank 0 sends ``send`` bytes and receives ``receive`` bytes,
    ``layers`` times per step; prints ms per step."""
    import datetime
    import os

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    out, back = torch.zeros(send, dtype=torch.uint8), torch.zeros(receive, dtype=torch.uint8)
    t = time.perf_counter()
    for i in range(layers * (steps + 1)):
        if i == layers:  # the first step warms the connection up
            t = time.perf_counter()
        if rank == 0:
            w = dist.isend(out, dst=1, tag=1)
            dist.irecv(back, src=1, tag=1).wait()
            w.wait()
        else:
            dist.recv(out, src=0, tag=1)
            dist.send(back, dst=0, tag=1)
    if rank == 0:
        print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - t) / steps}), flush=True)
    os._exit(0)


def measure_pingpong(send: int, receive: int, layers: int, steps: int) -> float:
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "-", "--pingpong", str(send), str(receive), str(layers), str(steps)]
    worker = subprocess.Popen(cmd, env={**env, "RANK": "1"}, stdout=subprocess.DEVNULL)
    out = subprocess.run(cmd, env={**env, "RANK": "0"}, capture_output=True, text=True, check=True, timeout=600)
    worker.wait(timeout=60)
    return json.loads(out.stdout)["ms_per_step"]


def summarize(r: dict, workers: int, stagger: bool, batch: int) -> dict:
    s = r["stats"]
    steps = s["forwards"]["decode"]
    per = lambda seconds: 1000.0 * seconds / steps  # noqa: E731
    attention = max(k["decode"] for k in s["attention_seconds_by_kind"])  # the slowest worker
    row = {"workers": workers, "stagger": stagger, "batch": batch, "decode_steps": steps,
           "dense_ms_per_step": per(s["dense_seconds"]["decode"]),
           "attention_ms_per_step": per(attention),
           "wait_ms_per_step": per(s["wait_seconds"]["decode"]),
           "submit_ms_per_step": per(s["submit_seconds"]["decode"]),
           "step_ms": per(s["total_seconds"]["decode"]),
           "tokens_per_s": batch * steps / s["total_seconds"]["decode"],
           "predicted_bytes_per_step": r["predicted_bytes_per_step"]}
    row["transfer_ms_per_step"] = (row["step_ms"] - row["dense_ms_per_step"] - row["attention_ms_per_step"]
                                   if workers and not stagger else None)
    if workers:
        b = s["bytes_by_kind"]["decode"]
        row["measured_bytes_per_step"] = {"sent": b["sent"] // steps, "received": b["received"] // steps}
        row["bytes_equal_prediction"] = (b["sent"] == steps * r["predicted_bytes_per_step"]["sent"]
                                         and b["received"] == steps * r["predicted_bytes_per_step"]["received"])
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--threads", type=int, help="CPU kernel threads of every process (default: as compiled)")
    p.add_argument("--json", default=str(HERE / "results" / "offload_measured.json"))
    p.add_argument("--child", nargs=3, metavar=("WORKERS", "STAGGER", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--pingpong", nargs=4, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pingpong:
        pingpong(*args.pingpong)
        return
    if args.child:
        workers, stagger, out = args.child
        Path(out).write_text(json.dumps(rank0(args.artifact, int(workers), stagger == "1", args.batch, args.new_tokens,
                                              args.threads)))
        return
    sys.path.insert(0, str(HERE))
    from machine import machine_line
    manifest = json.loads((Path(args.artifact) / "offload.json").read_text())
    configs = [(0, False)] + [(int(w), st) for w in args.workers.split(",") for st in (False, True)]
    rows, tokens = [], {}
    for workers, stagger in configs:
        out = Path(f"/tmp/offload_measure_{workers}_{int(stagger)}.json")
        threads = ["--threads", str(args.threads)] if args.threads is not None else []
        subprocess.run([sys.executable, __file__, args.artifact, "--batch", str(args.batch), "--new-tokens",
                        str(args.new_tokens), *threads, "--child", str(workers), str(int(stagger)), str(out)], check=True,
                       cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        r = json.loads(out.read_text())
        rows.append(summarize(r, workers, stagger, args.batch))
        tokens[(workers, stagger)] = r["tokens"]
        print(json.dumps(rows[-1]), flush=True)
    same = all(t == tokens[(0, False)] for t in tokens.values())
    layers = len([st for st in manifest["schedule"]["steps"] if st["device"] == "attention"])
    per_step = rows[1]["predicted_bytes_per_step"]
    ping = measure_pingpong(per_step["sent"] // layers, per_step["received"] // layers, layers, args.new_tokens - 1)
    off = {r["workers"]: r for r in rows if not r["stagger"]}
    on = {r["workers"]: r for r in rows if r["stagger"]}
    one = off[min(w for w in off if w)]
    result = {
        "machine": machine_line(), "artifact": str(args.artifact),
        "targets": {"dense": manifest["dense"]["target"], "attention": manifest["attention"]["target"]},
        "model": "smollm2-135m" if "smol" in str(args.artifact).lower() else str(args.artifact),
        "batch": args.batch, "new_tokens": args.new_tokens, "link": "loopback (gloo over TCP, 127.0.0.1)",
        "greedy_tokens_equal_across_runs": same,
        "summary": {  # the figures the planner's comparison reads (1 worker, staggering off)
            "dense_ms_per_token": one["dense_ms_per_step"] / args.batch,
            "attention_ms_per_token": one["attention_ms_per_step"] / args.batch,
            "transfer_ms_per_token": one["transfer_ms_per_step"] / args.batch,
            "pingpong_ms_per_token": ping / args.batch,
            "bytes_per_token": (one["measured_bytes_per_step"]["sent"] + one["measured_bytes_per_step"]["received"])
            / args.batch,
            "stagger_off_step_ms": {w: off[w]["step_ms"] for w in off},
            "stagger_on_step_ms": {w: on[w]["step_ms"] for w in on},
            "stagger_speedup": {w: off[w]["step_ms"] / on[w]["step_ms"] for w in on},
        },
        "pingpong_ms_per_step": ping,
        "threads_per_process": args.threads,
        "runs": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
