"""Loopback transfer on this machine: torch.distributed (gloo) between two local processes.

1. Fits a link (per-message latency, bandwidth) from ping-pongs of 8-byte and 16 MiB messages;
2. measures one decode step's exchange of a model (per layer: q/k/v out, attention output back,
   the sizes the cost model reads from the IR) and compares it with the cost model's
   ``transfer_seconds`` on the fitted link. The fit and the check use different message sizes,
   so the check tests the model's form (latency per message + bytes / bandwidth), not the fit.
Usage: python benchmarks/offload_link_probe.py [--model smollm2-135m-shape] [--batch 1,4,16]
Wall-clock medians (the machine is shared; see the load average in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402

from bitsmith.offload_planning.cost_model import transfer_seconds  # noqa: E402
from bitsmith.offload_planning.presets import LinkPreset  # noqa: E402
from bitsmith.offload_planning.profile import decode_bindings, decode_profile  # noqa: E402
from bitsmith.offload_planning.roofline import AS_IR  # noqa: E402
from bitsmith.offload_planning.sources import load_model  # noqa: E402


def _exchange(rank: int, sizes: list[tuple[int, int]], repeats: int) -> list[float]:
    """Rank 0 sends each (out, back) pair's ``out`` bytes and waits for ``back`` bytes; seconds per round."""
    bufs = [(torch.empty(o, dtype=torch.uint8), torch.empty(b, dtype=torch.uint8)) for o, b in sizes]
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t = time.perf_counter()
        for out, back in bufs:
            if rank == 0:
                dist.send(out, 1)
                dist.recv(back, 1)
            else:
                dist.recv(out, 0)
                dist.send(back, 0)
        times.append(time.perf_counter() - t)
    return times[1:]


def _worker(rank: int, port: int, plan: dict, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {name: _exchange(rank, sizes, plan["repeats"]) for name, sizes in plan["cases"].items()}
        if rank == 0:
            queue.put(results)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-shape")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/offload_link_probe.json")
    a = ap.parse_args()
    name, module = load_model(a.model)
    prof = decode_profile(module, AS_IR, name)
    small, big, rounds = 8, 16 << 20, 50
    cases = {"small": [(small, small)] * rounds, "big": [(big, big)] * 4}
    per_layer = {}
    for batch in (int(x) for x in a.batch.split(",")):
        sent, received = prof.transfer_bytes(decode_bindings(batch, a.context))
        per_layer[batch] = (sent // prof.layers, received // prof.layers)
        cases[f"decode_b{batch}"] = [per_layer[batch]] * prof.layers
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, {"cases": cases, "repeats": a.repeats}, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    med = {k: statistics.median(v) for k, v in results.items()}
    latency = med["small"] / rounds / 2  # one message each way per round
    bandwidth = 2 * 4 * big / (med["big"] - 2 * 4 * latency)
    link = LinkPreset("loopback-fitted", bandwidth, latency, "fitted by this script")
    rows = []
    for batch, (s, r) in per_layer.items():
        predicted = transfer_seconds(prof, batch, a.context, link)
        rows.append({"batch": batch, "bytes_sent_per_layer": s, "bytes_received_per_layer": r,
                     "layers": prof.layers, "measured_ms": med[f"decode_b{batch}"] * 1e3,
                     "predicted_ms": predicted * 1e3})
    out = {"model": name, "machine": machine_line(), "load_average": os.getloadavg(),
           "backend": "torch.distributed gloo over 127.0.0.1, 2 processes",
           "fitted_latency_us": latency * 1e6, "fitted_bandwidth_gbps": bandwidth / 1e9, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
