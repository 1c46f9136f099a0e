"""Rank 0 of an offloaded model: runs the schedule's dense steps and hands each attention step
to the attention side (``Shards``: in this process, or workers over torch.distributed).

With ``stagger`` and a batch of two or more rows, the batch is cut into two micro-batches that
alternate (Lamina's staggered pipelining): while the attention side works on one micro-batch's
layer i, rank 0 runs the dense part of the other, so both sides and the link overlap.
A forward whose positions start at 0 starts a new sequence (the caches are reset); any other
forward must continue the current one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ...backends.base import Executable
from ...errors import BitsmithError
from .attention_side import AttentionShard
from .schedule import AttentionStep, Schedule, merge

RunFn = Callable[[str, Sequence[np.ndarray]], list[np.ndarray]]


class OffloadError(BitsmithError):
    """The attention side failed: a worker died, timed out or refused a request."""


class Pending(Protocol):
    def wait(self) -> list[np.ndarray]: ...


class Shards(Protocol):
    """The attention side as rank 0 sees it."""

    def begin(self, seq: int, reset: bool, rows: Sequence[int]) -> None: ...

    def submit(self, step: AttentionStep, mb: int, inputs: Sequence[np.ndarray]) -> Pending: ...

    def close(self) -> dict[str, Any]: ...


@dataclass
class _Done:
    outputs: list[np.ndarray]

    def wait(self) -> list[np.ndarray]:
        return self.outputs


class LocalShards:
    """Every kv head in this process (no workers): the same folding as a worker with all heads."""

    def __init__(self, shard: AttentionShard) -> None:
        self.shard = shard
        self.seq = 0
        self.by_kind = {"prefill": 0.0, "decode": 0.0}

    def begin(self, seq: int, reset: bool, rows: Sequence[int]) -> None:
        if reset:
            self.shard.reset(rows)
        self.seq = seq

    def submit(self, step: AttentionStep, mb: int, inputs: Sequence[np.ndarray]) -> Pending:
        from .schedule import shard
        parts = [shard(x, step.roles[i], step.kv_heads, self.shard.heads) for i, x in zip(step.sent, inputs)]
        before = self.shard.seconds
        outs = self.shard.step(step, mb, parts)
        self.by_kind["decode" if self.seq == 1 else "prefill"] += self.shard.seconds - before
        if step is _last(self.shard.schedule) and mb == len(self.shard.rows) - 1:
            self.shard.end_forward(self.seq)
        return _Done([merge([o], self.shard.rows[mb]) for o in outs])

    def close(self) -> dict[str, Any]:
        return {"workers": 0, "attention_seconds": [self.shard.seconds], "attention_seconds_by_kind": [self.by_kind]}


def _last(schedule: Schedule) -> AttentionStep:
    return schedule.attention_steps[-1]


@dataclass
class Stats:
    """Wall time and bytes of the forwards run, split by prefill (seq > 1) and decode (seq 1)."""

    forwards: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    dense_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    wait_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    total_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    submit_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})


class OffloadEngine:
    def __init__(self, schedule: Schedule, dense_run: RunFn, shards: Shards, stagger: bool = False) -> None:
        self.schedule, self.dense_run, self.shards, self.stagger = schedule, dense_run, shards, stagger
        self.stats = Stats()
        self.batch: int | None = None
        self.next_position: int | None = None
        self.lock = threading.Lock()  # one forward at a time: the caches are one sequence's

    def micro_batches(self, batch: int) -> list[slice]:
        if not self.stagger or batch < 2:
            return [slice(0, batch)]
        half = (batch + 1) // 2
        return [slice(0, half), slice(half, batch)]

    def forward(self, *inputs: np.ndarray) -> np.ndarray:
        """Logits for ``inputs`` (the schedule's non-cache parameters: input_ids, position_ids, ...)."""
        if len(inputs) != len(self.schedule.inputs):
            raise ValueError(f"an offloaded model takes {', '.join(self.schedule.inputs)}; got {len(inputs)} arrays")
        with self.lock:
            return self._forward([np.asarray(x) for x in inputs])

    def _forward(self, inputs: list[np.ndarray]) -> np.ndarray:
        ids, pos = inputs[0], inputs[1]
        b, seq = ids.shape
        start = int(pos[0, 0])
        reset = start == 0
        if not reset and (b != self.batch or start != self.next_position):
            raise OffloadError(f"forward at position {start} with batch {b} does not continue the current sequence "
                               f"(batch {self.batch}, next position {self.next_position}); start again at position 0")
        self.batch, self.next_position = b, start + seq
        kind = "decode" if seq == 1 else "prefill"
        t_start = time.perf_counter()
        mbs = self.micro_batches(b)
        self.shards.begin(seq, reset, [m.stop - m.start for m in mbs])
        env = [dict(zip(self.schedule.inputs, (x[m] for x in inputs))) for m in mbs]
        pending: list[tuple[AttentionStep, Pending] | None] = [None] * len(mbs)
        dense = wait = submit = 0.0
        for dense_steps, attention in self.schedule.stages():
            for k, values in enumerate(env):
                if pending[k] is not None:
                    step, p = pending[k]
                    t = time.perf_counter()
                    outs = p.wait()
                    wait += time.perf_counter() - t
                    values.update(zip((step.outputs[i] for i in step.returned), outs))
                    pending[k] = None
                t = time.perf_counter()
                for d in dense_steps:
                    values.update(zip(d.outputs, self.dense_run(d.callee, [values[v] for v in d.inputs])))
                dense += time.perf_counter() - t
                if attention is not None:
                    t = time.perf_counter()
                    inputs = [values[attention.inputs[i]] for i in attention.sent]
                    pending[k] = (attention, self.shards.submit(attention, k, inputs))
                    submit += time.perf_counter() - t
        logits = np.concatenate([values[self.schedule.results[0]] for values in env], axis=0)
        s = self.stats
        s.forwards[kind] += 1
        s.tokens[kind] += b * seq
        s.dense_seconds[kind] += dense
        s.wait_seconds[kind] += wait
        s.submit_seconds[kind] += submit
        s.total_seconds[kind] += time.perf_counter() - t_start
        return logits

    def close(self) -> dict[str, Any]:
        """Ends the attention side (workers exit) and returns the timing and byte figures."""
        report = self.shards.close()
        s = self.stats
        return {"forwards": s.forwards, "tokens": s.tokens, "dense_seconds": s.dense_seconds,
                "wait_seconds": s.wait_seconds, "submit_seconds": s.submit_seconds, "total_seconds": s.total_seconds,
                **report}


class OffloadExecutable(Executable):
    """``run("main", [input_ids, position_ids, ...])`` -> [logits]: what a CompiledModel calls;
    the KV cache never leaves the attention side, so ``main`` takes and returns no cache."""

    def __init__(self, engine: OffloadEngine, report: dict[str, Any]) -> None:
        self.engine, self._report = engine, report

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function != "main":
            raise ValueError(f"an offloaded model runs main only, not {function}")
        return [self.engine.forward(*args)]

    def report(self) -> dict[str, Any]:
        return dict(self._report)
