"""Starting an offloaded model: in one process, as rank 0 of a torchrun job, or as rank 0 that
starts its own N attention workers on the loopback interface (``--attention-workers N``).

Every process finds the others through torch.distributed's env:// rendezvous (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so the same command under ``torchrun --nnodes 2 ...`` spreads the
workers over machines unchanged; rank 0 needs ``dense/``, a worker only ``attention/``.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

from .artifact import ATTENTION_DIR, DENSE_DIR, load_side, read_offload_manifest
from .attention_side import AttentionShard, group_types
from .distributed import DistributedShards, init, serve
from .engine import OffloadError
from .model import OffloadedModel, assemble, env_rank
from .schedule import head_split

DEFAULT_TIMEOUT = 60.0  # seconds any one wait may take before the run ends with an error


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(path: str, workers: int, timeout: float, trust_native_code: bool,
                   threads: int | None) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """N worker processes (ranks 1..N) on 127.0.0.1, and the rendezvous for this process as rank 0
    (kept out of os.environ, so a later load in this process does not think it runs under torchrun)."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(workers + 1)}
    package_root = str(Path(__file__).resolve().parents[3])  # the same bitsmith in the children
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "bitsmith.runtime.offload.worker", str(path), "--timeout", str(timeout)]
    if trust_native_code:
        cmd.append("--trust-native-code")
    if threads is not None:
        cmd += ["--threads", str(threads)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.DEVNULL)
             for r in range(1, workers + 1)]
    atexit.register(_reap, procs)
    return procs, {**{k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}, "RANK": "0"}


def _reap(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """Waits a bounded time for the workers started here, then kills those still running."""
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def load_offloaded(path: str, attention_workers: int = 0, stagger: bool = False, timeout: float = DEFAULT_TIMEOUT,
                   trust_native_code: bool = False, threads: int | None = None) -> OffloadedModel:
    """Rank 0's model. Without workers (and outside torchrun) attention runs in this process;
    with ``attention_workers`` N outside torchrun, N local worker processes are started; under
    torchrun the workers are ranks 1..WORLD_SIZE-1."""
    manifest = read_offload_manifest(path)
    rank = env_rank()
    procs: list[subprocess.Popen] = []
    rendezvous: dict[str, str] | None = None  # None: torchrun's environment
    if rank is None and attention_workers:
        head_split(manifest.schedule.kv_heads, attention_workers)  # a bad N fails before anything starts
        procs, rendezvous = _start_workers(path, attention_workers, timeout, trust_native_code, threads)
        rank = 0
    elif rank is not None:
        world = int(os.environ["WORLD_SIZE"])
        if rank != 0:
            raise OffloadError(f"rank {rank} is an attention worker: run it with serve_worker (bitsmith run does)")
        if attention_workers and attention_workers != world - 1:
            raise ValueError(f"--attention-workers {attention_workers} but torchrun started {world} processes "
                             f"(rank 0 + {world - 1} workers)")
        attention_workers = world - 1
    dense = load_side(path, DENSE_DIR, trust_native_code, threads)
    transfer = manifest.doc.get("transfer_bytes_per_token", {})
    if not attention_workers:
        attention = load_side(path, ATTENTION_DIR, trust_native_code, threads)
        return assemble(dense, attention, manifest.schedule, None, stagger, transfer, manifest.attention_target)
    head_split(manifest.schedule.kv_heads, attention_workers)
    init(timeout, rendezvous)
    shards = DistributedShards(manifest.schedule, attention_workers, timeout)
    model = assemble(dense, None, manifest.schedule, shards, stagger, transfer, manifest.attention_target)
    model.worker_processes = procs
    return model


def serve_worker(path: str, timeout: float = DEFAULT_TIMEOUT, trust_native_code: bool = False,
                 threads: int | None = None) -> None:
    """Rank r >= 1: loads ``attention/``, joins the group, serves kv heads head_split(...)[r-1]."""
    manifest = read_offload_manifest(path)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    heads = head_split(manifest.schedule.kv_heads, world - 1)[rank - 1]
    attention = load_side(path, ATTENTION_DIR, trust_native_code, threads)
    shard = AttentionShard(attention.run, manifest.schedule, group_types(attention.module, manifest.schedule), heads)
    init(timeout)
    # rank 0 may spend a while between forwards (loading, tokenizing): the idle wait is longer
    serve(shard, rank, timeout, idle_timeout=max(timeout, 600.0))
