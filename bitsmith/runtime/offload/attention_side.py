"""What an attention device holds and does: the KV cache of its kv heads, per micro-batch and
layer, and the attention program run on it (heads folded into the batch axis, see
``passes/kv_head_group.py``). Used by a worker process and, without workers, by rank 0 itself."""

from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import numpy as np

from ...ir import Module
from .schedule import AttentionStep, Schedule, TypeSpec

RunFn = Callable[[str, Sequence[np.ndarray]], list[np.ndarray]]


def group_types(module: Module, schedule: Schedule) -> dict[str, tuple[tuple[TypeSpec, ...], tuple[TypeSpec, ...]]]:
    """(parameter types, result types) of each attention program, for one kv-head group."""
    out = {}
    for s in schedule.attention_steps:
        fn = module.function(s.callee)
        types = fn.value_types()
        out[s.callee] = (tuple(TypeSpec(p.type.shape, p.type.dtype) for p in fn.params),
                         tuple(TypeSpec(types[r].shape, types[r].dtype) for r in fn.results))
    return out


class AttentionShard:
    """The kv heads ``heads`` of every layer; ``step`` appends the new keys/values to the cache
    and returns the attention output for those heads ([rows*m, g, seq, dv])."""

    def __init__(self, run: RunFn, schedule: Schedule, types: Mapping[str, tuple[tuple[TypeSpec, ...], tuple[TypeSpec, ...]]],
                 heads: tuple[int, int]) -> None:
        self.run_fn, self.schedule, self.types, self.heads = run, schedule, types, heads
        self.m = heads[1] - heads[0]
        self.state: list[dict[int, list[np.ndarray | None]]] = []
        self.rows: list[int] = []
        self.past: list[int] = []
        self.seconds = 0.0

    def reset(self, rows: Sequence[int]) -> None:
        """A new sequence: empty caches for micro-batches of ``rows`` rows each."""
        self.rows = list(rows)
        self.past = [0] * len(rows)
        self.state = []
        for r in rows:
            per_layer = {}
            for s in self.schedule.attention_steps:
                params, _ = self.types[s.callee]
                per_layer[s.layer] = [np.zeros(params[i].evaluate({"batch": r * self.m, "past": 0}), params[i].dtype)
                                      if role == "state" else None for i, role in enumerate(s.roles)]
            self.state.append(per_layer)

    def input_shapes(self, step: AttentionStep, mb: int, seq: int) -> list[tuple[tuple[int, ...], str]]:
        """Shapes and dtypes of the inputs sent to this shard (the non-state parameters)."""
        params, _ = self.types[step.callee]
        rows = self.rows[mb]
        out = []
        for i in step.sent:
            batch = rows * self.m if step.roles[i] in ("q", "kv") else rows
            out.append((params[i].evaluate({"batch": batch, "seq": seq, "past": self.past[mb]}), params[i].dtype))
        return out

    def end_forward(self, seq: int) -> None:
        self.past = [p + seq for p in self.past]

    def step(self, step: AttentionStep, mb: int, sent: Sequence[np.ndarray]) -> list[np.ndarray]:
        cache = self.state[mb][step.layer]
        args: list[np.ndarray] = []
        it = iter(sent)
        for i, role in enumerate(step.roles):
            if role == "state":
                args.append(cache[i])
            else:
                x = next(it)
                args.append(np.repeat(x, self.m, axis=0) if role == "other" and self.m > 1 else x)
        t = time.perf_counter()
        outs = self.run_fn(step.callee, args)
        self.seconds += time.perf_counter() - t
        for out, s in zip(outs, step.result_state):
            if s >= 0:
                cache[s] = out
        return [outs[i] for i in step.returned]
