"""Attention workers over torch.distributed (gloo on CPU; the env:// rendezvous, so ``torchrun``
starts the same processes on one machine or many).

Rank 0 runs the dense program and sampling; rank r >= 1 holds kv heads ``head_split(...)[r-1]``
of every layer. Per forward, rank 0 sends each worker a header (tag 0) and then, per layer and
micro-batch, the worker's share of the attention inputs packed into one byte buffer (tag 1 +
micro-batch); the worker answers with its share of the output on the same tag. Every wait is bounded by ``timeout``: a
dead worker (connection reset) or a silent one ends the run with an OffloadError naming its
rank, never a hang. ``bytes_sent``/``bytes_received`` count the tensor payloads rank 0 moves
(headers separately), the figure the pass predicts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .attention_side import AttentionShard
from .engine import OffloadError
from .schedule import AttentionStep, Schedule, head_split, merge, pack, packed_size, shard, shard_shape, unpack

FORWARD, STOP = 1, 2
HEADER = 6  # [command, seq, reset, micro-batches, rows of micro-batch 0, rows of micro-batch 1]
STATS = 3   # a worker's answer to STOP: attention seconds, prefill seconds, decode seconds


def _torch():
    import torch
    import torch.distributed as dist
    return torch, dist


def init(timeout: float, rendezvous: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Joins the process group: from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    as torchrun sets them) or from ``rendezvous`` holding the same keys (workers started here)."""
    torch, dist = _torch()
    env = os.environ if rendezvous is None else rendezvous
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in env:
            raise OffloadError(f"torch.distributed rendezvous needs {var} in the environment (torchrun sets it)")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                                rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                                timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # the store raises its own types on a rendezvous timeout
        raise OffloadError(f"rank {env['RANK']}: the {env['WORLD_SIZE']} processes did not all join "
                           f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} within {timeout:g} s: "
                           f"{' '.join(str(e).split())[:300]}") from None
    return dist.get_rank(), dist.get_world_size()


def _wait(work: Any, timeout: float, rank: int, what: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:
        raise OffloadError(f"attention worker rank {rank} failed while {what} (dead, stuck or unreachable; "
                           f"timeout {timeout:g} s): {' '.join(str(e).split())[:300]}") from None


@dataclass
class _Pending:
    shards: "DistributedShards"
    step: AttentionStep
    rows: int
    recvs: list[tuple[int, Any, Any, list[tuple[tuple[int, ...], str]]]]  # (rank, work, buffer, specs)

    def wait(self) -> list[np.ndarray]:
        per_output: list[list[np.ndarray]] = [[] for _ in self.step.returned]
        for rank, work, buffer, specs in self.recvs:
            _wait(work, self.shards.timeout, rank, f"computing layer {self.step.layer}")
            for k, out in enumerate(unpack(buffer.numpy(), specs)):
                per_output[k].append(out)
            self.shards.bytes_received += buffer.numel()
            self.shards.by_kind[self.shards.kind]["received"] += buffer.numel()
        return [merge(parts, self.rows) for parts in per_output]


class DistributedShards:
    """Rank 0's side of the workers (ranks 1..N)."""

    def __init__(self, schedule: Schedule, workers: int, timeout: float) -> None:
        self.torch, self.dist = _torch()
        self.schedule, self.timeout = schedule, timeout
        self.heads = head_split(schedule.kv_heads, workers)
        self.bytes_sent = self.bytes_received = self.header_bytes = 0
        self.by_kind = {k: {"sent": 0, "received": 0} for k in ("prefill", "decode")}
        self.kind = "prefill"
        self.rows: list[int] = []
        self.seq = 0
        self.sends: list[tuple[int, Any]] = []

    def _post(self, op: Any, tensor: Any, rank: int, tag: int) -> Any:
        """isend/irecv, a failure to even post it (peer gone) named by rank."""
        try:
            return op(tensor, rank, tag=tag)
        except Exception as e:
            raise OffloadError(f"attention worker rank {rank} is unreachable: {' '.join(str(e).split())[:300]}") from None

    def _send(self, rank: int, array: np.ndarray, tag: int, count: bool = True) -> None:
        t = self.torch.from_numpy(np.ascontiguousarray(array))
        self.sends.append((rank, self._post(self.dist.isend, t, rank, tag), t))
        nbytes = t.numel() * t.element_size()
        if count:
            self.bytes_sent += nbytes
            self.by_kind[self.kind]["sent"] += nbytes
        else:
            self.header_bytes += nbytes

    def _drain_sends(self) -> None:
        for rank, work, _ in self.sends:
            _wait(work, self.timeout, rank, "receiving from rank 0")
        self.sends = []

    def begin(self, seq: int, reset: bool, rows: Sequence[int]) -> None:
        self._drain_sends()
        self.rows, self.seq = list(rows), seq
        self.kind = "decode" if seq == 1 else "prefill"
        header = np.array([FORWARD, seq, int(reset), len(rows), rows[0], rows[-1]], dtype=np.int64)
        for rank in range(1, len(self.heads) + 1):
            self._send(rank, header, 0, count=False)

    def submit(self, step: AttentionStep, mb: int, inputs: Sequence[np.ndarray]) -> _Pending:
        recvs = []
        rows = self.rows[mb]
        for rank, heads in enumerate(self.heads, start=1):
            self._send(rank, pack([shard(x, step.roles[i], step.kv_heads, heads) for i, x in zip(step.sent, inputs)]),
                       1 + mb)
            specs = [(shard_shape(step.output_types[i].evaluate({"batch": rows, "seq": self.seq}), step.kv_heads, heads),
                      step.output_types[i].dtype) for i in step.returned]
            buffer = self.torch.from_numpy(np.empty(packed_size(specs), np.uint8))
            recvs.append((rank, self._post(self.dist.irecv, buffer, rank, 1 + mb), buffer, specs))
        return _Pending(self, step, rows, recvs)

    def close(self) -> dict[str, Any]:
        """Stops the workers and collects their attention seconds."""
        self._drain_sends()
        stop = np.array([STOP, 0, 0, 0, 0, 0], dtype=np.int64)
        seconds = []
        for rank in range(1, len(self.heads) + 1):
            self._send(rank, stop, 0, count=False)
            buf = self.torch.zeros(STATS, dtype=self.torch.float64)
            _wait(self._post(self.dist.irecv, buf, rank, 0), self.timeout, rank, "stopping")
            seconds.append(buf.numpy().tolist())
        self._drain_sends()
        self.dist.destroy_process_group()  # this process may load another offloaded model later
        return {"workers": len(self.heads), "heads": self.heads,
                "attention_seconds": [s[0] for s in seconds],
                "attention_seconds_by_kind": [{"prefill": s[1], "decode": s[2]} for s in seconds],
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "bytes_by_kind": self.by_kind,
                "header_bytes": self.header_bytes}


def serve(shard_: AttentionShard, rank: int, timeout: float, idle_timeout: float) -> None:
    """A worker's loop: answers rank 0's forwards until STOP (or an error, raised as OffloadError).
    ``idle_timeout`` bounds the wait for the next header (rank 0 may be loading or sampling)."""
    torch, dist = _torch()
    by_kind = {"prefill": 0.0, "decode": 0.0}
    sends: list[Any] = []

    def recv(shape: tuple[int, ...], dtype: str, tag: int, limit: float, what: str) -> np.ndarray:
        buf = torch.from_numpy(np.empty(shape, dtype))
        try:
            dist.irecv(buf, src=0, tag=tag).wait(timeout=datetime.timedelta(seconds=limit))
        except Exception as e:
            raise OffloadError(f"attention worker rank {rank}: rank 0 went away while {what} (timeout {limit:g} s): "
                               f"{' '.join(str(e).split())[:200]}") from None
        return buf.numpy()

    while True:
        header = recv((HEADER,), "int64", 0, idle_timeout, "waiting for the next forward")
        for w, _ in sends:  # rank 0 sent a new header: it has taken every answer
            w.wait(timeout=datetime.timedelta(seconds=timeout))
        sends = []
        command, seq, reset, n_mb, rows0, rows1 = (int(x) for x in header)
        if command == STOP:
            stats = torch.tensor([shard_.seconds, by_kind["prefill"], by_kind["decode"]], dtype=torch.float64)
            dist.isend(stats, dst=0, tag=0).wait(timeout=datetime.timedelta(seconds=timeout))
            return
        rows = [rows0, rows1][:n_mb]
        if reset:
            shard_.reset(rows)
        before = shard_.seconds
        for step in shard_.schedule.attention_steps:
            for mb in range(n_mb):
                specs = shard_.input_shapes(step, mb, seq)
                inputs = unpack(recv((packed_size(specs),), "uint8", 1 + mb, timeout, f"receiving layer {step.layer}"),
                                specs)
                t = torch.from_numpy(pack(shard_.step(step, mb, inputs)))
                sends.append((dist.isend(t, dst=0, tag=1 + mb), t))  # t stays alive until sent
        shard_.end_forward(seq)
        by_kind["decode" if seq == 1 else "prefill"] += shard_.seconds - before
