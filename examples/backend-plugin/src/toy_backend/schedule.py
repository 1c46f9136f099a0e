"""The toy target's program: each function lowered to a flat schedule of kernel calls, stored
in an artifact as ``target/schedule.json`` and read back at load (never re-lowered).

Format (version 1)::

    {"format": "toy-schedule", "version": 1,
     "functions": [{"name": "main",
                    "params": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
                    "steps": [{"op": "linear", "inputs": ["x", "w"], "outputs": ["y"],
                               "dtypes": ["float32"], "attrs": {}}],
                    "results": ["y"]}]}

Dims are ints or symbolic strings (``"batch"``, ``"past+seq"``), bound from the arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bitsmith.errors import ArtifactError
from bitsmith.ir import Module

DTYPES = frozenset({"float32", "int64", "bool"})  # what the toy kernels compute in

FORMAT, VERSION = "toy-schedule", 1


@dataclass(frozen=True)
class Step:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: tuple[str, ...]
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class FunctionSchedule:
    name: str
    params: tuple[Param, ...]
    steps: tuple[Step, ...]
    results: tuple[str, ...]


def _plain(value: Any) -> Any:
    """Attribute values as JSON keeps them (tuples become lists; kernels accept both)."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def lower(module: Module) -> dict[str, FunctionSchedule]:
    """One schedule per function, steps in the function's (topological) node order."""
    out = {}
    for fn in module.functions:
        steps = tuple(Step(n.op, tuple(n.inputs), tuple(v.name for v in n.outputs),
                           tuple(v.type.dtype for v in n.outputs), {k: _plain(v) for k, v in n.attrs})
                      for n in fn.nodes)
        params = tuple(Param(p.name, tuple(p.type.shape), p.type.dtype) for p in fn.params)
        out[fn.name] = FunctionSchedule(fn.name, params, steps, tuple(fn.results))
    return out


def to_json(schedules: dict[str, FunctionSchedule]) -> bytes:
    doc = {"format": FORMAT, "version": VERSION, "functions": [
        {"name": f.name, "params": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in f.params],
         "steps": [{"op": s.op, "inputs": list(s.inputs), "outputs": list(s.outputs), "dtypes": list(s.dtypes),
                    "attrs": s.attrs} for s in f.steps],
         "results": list(f.results)} for f in schedules.values()]}
    return json.dumps(doc, sort_keys=True).encode()


def from_json(data: bytes, where: str) -> dict[str, FunctionSchedule]:
    """Parses a stored schedule; any malformed field is an ArtifactError naming ``where``."""
    try:
        doc = json.loads(data)
        if (doc.get("format"), doc.get("version")) != (FORMAT, VERSION):
            raise ArtifactError(where, f"not a {FORMAT} version {VERSION} document")
        out = {}
        for f in doc["functions"]:
            params = tuple(Param(p["name"], tuple(p["shape"]), p["dtype"]) for p in f["params"])
            steps = tuple(Step(s["op"], tuple(s["inputs"]), tuple(s["outputs"]), tuple(s["dtypes"]), dict(s["attrs"]))
                          for s in f["steps"])
            out[f["name"]] = _checked(FunctionSchedule(f["name"], params, steps, tuple(f["results"])), where)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ArtifactError(where, f"malformed schedule: {type(e).__name__}: {e}") from None


def _checked(fs: FunctionSchedule, where: str) -> FunctionSchedule:
    """Refuses at load what ``run`` could not execute: an op without a kernel, a dtype the toy
    does not compute in, a value read before it is defined, a step without exactly one output."""
    from .kernels import KERNELS  # kernels import nothing from here; keeps this module light

    defined = {p.name for p in fs.params}
    for p in fs.params:
        if p.dtype not in DTYPES:
            raise ArtifactError(where, f"@{fs.name}: parameter {p.name!r} has dtype {p.dtype!r}; the toy runs {sorted(DTYPES)}")
    for i, s in enumerate(fs.steps):
        if s.op != "constant" and s.op not in KERNELS:
            raise ArtifactError(where, f"@{fs.name} step {i}: op {s.op!r} has no toy kernel")
        if len(s.outputs) != 1 or len(s.dtypes) != 1 or s.dtypes[0] not in DTYPES:
            raise ArtifactError(where, f"@{fs.name} step {i} ({s.op}): needs one output of a dtype in {sorted(DTYPES)}")
        missing = [v for v in s.inputs if v not in defined]
        if missing:
            raise ArtifactError(where, f"@{fs.name} step {i} ({s.op}): reads {missing[0]!r} before it is defined")
        defined.add(s.outputs[0])
    if any(r not in defined for r in fs.results):
        raise ArtifactError(where, f"@{fs.name}: a result is never defined")
    return fs

