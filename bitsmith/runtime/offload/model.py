"""OffloadedModel: a CompiledModel whose ``main`` runs split between the dense program (here)
and the attention program (here, or on attention workers over torch.distributed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ...ir import Function, Module, TensorType, Value
from ..model import CompiledModel
from .attention_side import AttentionShard, group_types
from .engine import LocalShards, OffloadEngine, OffloadExecutable, Shards
from .schedule import Schedule


def facade_module(dense: Module, schedule: Schedule) -> Module:
    """A module whose ``main(input_ids, position_ids, ...)`` (no cache parameters) stands for the
    whole split model: the generation loop reads its attrs and parameters; the cache lives on
    the attention side."""
    types = {p.name: p.type for f in dense.functions for p in f.params}
    params = tuple(Value(n, types.get(n, TensorType(("batch", "seq"), "int64"))) for n in schedule.inputs)
    return Module(functions=(Function("main", params, (), ()),), attrs=dense.attrs)


@dataclass
class OffloadedModel(CompiledModel):
    dense: CompiledModel | None = None
    attention: CompiledModel | None = None  # None on a rank 0 whose attention runs on workers
    schedule: Schedule | None = None
    engine: OffloadEngine | None = None
    transfer: dict[str, Any] = field(default_factory=dict)
    worker_processes: list[Any] = field(default_factory=list)  # the local workers this process started

    def save(self, path: str) -> None:
        from .artifact import save_offloaded
        if self.attention is None:
            raise ValueError("this offloaded model was loaded without its attention program; save from a full load")
        save_offloaded(self.dense, self.attention, self.schedule, self.transfer, path)

    def close(self) -> dict[str, Any]:
        """Stops the attention side (workers exit); returns the engine's timing and byte figures."""
        try:
            return self.engine.close()
        finally:
            from .launch import _reap
            _reap(self.worker_processes)

    def report(self) -> dict[str, Any]:
        return {**self.dense.report(), "target": self.target, "attention_target": self.attention_target,
                "transfer_bytes_per_token": self.transfer}

    @property
    def attention_target(self) -> str:
        return self.options.get("attention_target", "")


def assemble(dense: CompiledModel, attention: CompiledModel | None, schedule: Schedule, shards: Shards | None,
             stagger: bool, transfer: dict[str, Any], attention_target: str) -> OffloadedModel:
    """The model rank 0 runs: attention in this process when ``shards`` is None."""
    if shards is None:
        assert attention is not None
        kv = schedule.kv_heads
        shards = LocalShards(AttentionShard(attention.run, schedule, group_types(attention.module, schedule), (0, kv)))
    engine = OffloadEngine(schedule, dense.run, shards, stagger)
    executable = OffloadExecutable(engine, {"executor": "offload", "dense": dense.executable.report(),
                                            "workers": 0 if isinstance(shards, LocalShards) else "distributed"})
    return OffloadedModel(facade_module(dense.module, schedule), executable, dense.target,
                          {**dense.options, "attention_target": attention_target}, dense.lm, dict(dense.compile_info),
                          {}, dense, attention, schedule, engine, transfer)


def env_rank() -> int | None:
    """This process's rank when launched by torchrun (or our launcher), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None
