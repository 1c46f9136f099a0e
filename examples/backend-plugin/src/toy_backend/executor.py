"""Runs a stored schedule: one kernel call per step, values in a per-call dict (thread-safe)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from bitsmith.backends.base import Executable
from bitsmith.errors import BitsmithError
from bitsmith.ir import symbolic

from . import schedule as sched
from .kernels import KERNELS


class ToyExecutable(Executable):
    def __init__(self, schedules: dict[str, sched.FunctionSchedule], tensors: Mapping[str, np.ndarray]) -> None:
        self.schedules = schedules
        self.tensors = tensors

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        fs = self.schedules.get(function)
        if fs is None:
            raise BitsmithError(f"toy-numpy: no function {function!r}; it has {sorted(self.schedules)}")
        if len(args) != len(fs.params):
            raise BitsmithError(f"toy-numpy: @{function} takes {len(fs.params)} arguments, got {len(args)}")
        env: dict[str, np.ndarray] = {}
        bindings: dict[str, int] = {}
        for p, a in zip(fs.params, args):
            env[p.name] = a = np.asarray(a, dtype=p.dtype)
            for d, n in zip(p.shape, a.shape):
                if isinstance(d, str) and d.isidentifier():
                    bindings[d] = n

        def dim(d: Any) -> int:
            return d if isinstance(d, int) else symbolic.evaluate(d, bindings)

        for step in fs.steps:
            if step.op == "constant":
                out = self.tensors[step.attrs["name"]]
            else:
                with np.errstate(all="ignore"):
                    out = KERNELS[step.op]([env[v] for v in step.inputs], step.attrs, dim)
            env[step.outputs[0]] = np.asarray(out).astype(step.dtypes[0], copy=False)
        return [env[r] for r in fs.results]

    def files(self) -> dict[str, bytes]:
        return {"schedule.json": sched.to_json(self.schedules)}

    def report(self) -> dict[str, Any]:
        return {"executor": "toy numpy kernels (float32)",
                "steps": sum(len(f.steps) for f in self.schedules.values())}
