"""The partition of an offloaded artifact as data: the steps of the decode schedule and how
attention inputs and outputs are split by KV heads across attention workers.

Written by the compiler (``offload.json``, see docs/attention-offload.md) from the module that
``offload_attention`` made; read by the runtime without the IR parser or any pass. Every field
is checked on load (ArtifactError naming the field), and nothing in it is evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError
from ...ir import symbolic as sym

ROLES = ("state", "q", "kv", "other")


@dataclass(frozen=True)
class TypeSpec:
    """A tensor type as JSON: dims are ints or symbolic expressions (``"past+seq"``)."""

    shape: tuple[sym.Dim, ...]
    dtype: str

    def evaluate(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(sym.evaluate(d, bindings)) for d in self.shape)

    def nbytes(self, bindings: Mapping[str, int]) -> int:
        return int(np.prod(self.evaluate(bindings), dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "TypeSpec":
        shape, dtype = _field(doc, "shape", list, where), _field(doc, "dtype", str, where)
        if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise ArtifactError(where, f"shape {shape!r} holds something other than ints and dim expressions")
        try:
            np.dtype(dtype)
            for d in shape:
                sym.symbols(d) if isinstance(d, str) else None
        except (TypeError, ValueError, sym.SymbolicDimError) as e:
            raise ArtifactError(where, f"bad type {doc!r}: {e}") from None
        return cls(tuple(shape), dtype)


@dataclass(frozen=True)
class DenseStep:
    callee: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class AttentionStep:
    """One attention call: its inputs and outputs in the schedule's names, the role of each
    parameter (``state``: the cache, kept by the attention side; ``q``/``kv``: split by heads;
    ``other``: sent whole), and for each result the cache parameter it replaces (-1: sent back)."""

    callee: str
    layer: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    roles: tuple[str, ...]
    result_state: tuple[int, ...]
    input_types: tuple[TypeSpec, ...]   # full heads, the schedule's dims
    output_types: tuple[TypeSpec, ...]
    q_heads: int
    kv_heads: int
    send_bytes: sym.Dim                  # the pass's prediction, over batch and seq
    recv_bytes: sym.Dim

    @property
    def sent(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r != "state")

    @property
    def returned(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.result_state) if s < 0)


Step = DenseStep | AttentionStep


@dataclass(frozen=True)
class Schedule:
    function: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    steps: tuple[Step, ...]

    @property
    def attention_steps(self) -> tuple[AttentionStep, ...]:
        return tuple(s for s in self.steps if isinstance(s, AttentionStep))

    @property
    def inputs(self) -> tuple[str, ...]:
        """The parameters rank 0 feeds (input_ids, position_ids, ...): all but the cache."""
        state = {s.inputs[i] for s in self.attention_steps for i, r in enumerate(s.roles) if r == "state"}
        return tuple(p for p in self.params if p not in state)

    @property
    def kv_heads(self) -> int:
        return min(s.kv_heads for s in self.attention_steps)

    def stages(self) -> list[tuple[tuple[DenseStep, ...], AttentionStep | None]]:
        """The steps as (dense steps, the attention step they feed); the last has None."""
        out, dense = [], []
        for s in self.steps:
            if isinstance(s, AttentionStep):
                out.append((tuple(dense), s))
                dense = []
            else:
                dense.append(s)
        out.append((tuple(dense), None))
        return out

    def predicted_bytes(self, batch: int, seq: int) -> tuple[int, int]:
        """(sent, received) bytes of one forward over every layer, from the pass's formulas."""
        b = {"batch": batch, "seq": seq}
        steps = self.attention_steps
        return (sum(int(sym.evaluate(s.send_bytes, b)) for s in steps),
                sum(int(sym.evaluate(s.recv_bytes, b)) for s in steps))

    def to_json(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            if isinstance(s, DenseStep):
                steps.append({"device": "dense", "callee": s.callee, "inputs": list(s.inputs), "outputs": list(s.outputs)})
            else:
                steps.append({"device": "attention", "callee": s.callee, "layer": s.layer, "inputs": list(s.inputs),
                              "outputs": list(s.outputs), "roles": list(s.roles), "result_state": list(s.result_state),
                              "input_types": [t.to_json() for t in s.input_types],
                              "output_types": [t.to_json() for t in s.output_types], "q_heads": s.q_heads,
                              "kv_heads": s.kv_heads, "send_bytes": s.send_bytes, "recv_bytes": s.recv_bytes})
        return {"function": self.function, "params": list(self.params), "results": list(self.results), "steps": steps}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> "Schedule":
        steps: list[Step] = []
        for k, s in enumerate(_field(doc, "steps", list, where)):
            at = f"{where}: steps[{k}]"
            names = {f: tuple(_strings(_field(s, f, list, at), at)) for f in ("inputs", "outputs")}
            device = _field(s, "device", str, at)
            if device == "dense":
                steps.append(DenseStep(_field(s, "callee", str, at), names["inputs"], names["outputs"]))
                continue
            if device != "attention":
                raise ArtifactError(at, f"device {device!r} is neither dense nor attention")
            roles = tuple(_strings(_field(s, "roles", list, at), at))
            result_state = tuple(_field(s, "result_state", list, at))
            step = AttentionStep(
                _field(s, "callee", str, at), _field(s, "layer", int, at), names["inputs"], names["outputs"], roles,
                result_state, tuple(TypeSpec.from_json(t, at) for t in _field(s, "input_types", list, at)),
                tuple(TypeSpec.from_json(t, at) for t in _field(s, "output_types", list, at)),
                _field(s, "q_heads", int, at), _field(s, "kv_heads", int, at),
                _field(s, "send_bytes", (int, str), at), _field(s, "recv_bytes", (int, str), at))
            _check_attention_step(step, at)
            steps.append(step)
        sched = cls(_field(doc, "function", str, where), tuple(_strings(_field(doc, "params", list, where), where)),
                    tuple(_strings(_field(doc, "results", list, where), where)), tuple(steps))
        if not sched.attention_steps:
            raise ArtifactError(where, "the schedule has no attention step")
        if len({s.kv_heads for s in sched.attention_steps}) != 1:
            raise ArtifactError(where, "attention layers with different kv-head counts cannot share one head split")
        return sched


def _check_attention_step(s: AttentionStep, at: str) -> None:
    if any(r not in ROLES for r in s.roles) or len(s.roles) != len(s.inputs) or len(s.input_types) != len(s.inputs):
        raise ArtifactError(at, f"roles {s.roles!r} do not give one of {ROLES} per input")
    if len(s.result_state) != len(s.outputs) or len(s.output_types) != len(s.outputs) or not all(
            isinstance(i, int) and -1 <= i < len(s.inputs) and (i < 0 or s.roles[i] == "state") for i in s.result_state):
        raise ArtifactError(at, "result_state must give, per output, -1 or the index of a state input")
    if s.kv_heads < 1 or s.q_heads < 1 or s.q_heads % s.kv_heads:
        raise ArtifactError(at, f"{s.q_heads} query heads are not a multiple of {s.kv_heads} kv heads")


def _field(doc: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(doc, dict) or name not in doc:
        raise ArtifactError(where, f"missing field {name!r}")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ArtifactError(where, f"field {name!r} must be {kind}, got {type(value).__name__}")
    return value


def _strings(items: list, where: str) -> list[str]:
    if not all(isinstance(x, str) for x in items):
        raise ArtifactError(where, "expected a list of names")
    return items


# --- splitting by kv heads ------------------------------------------------------------------

def head_split(kv_heads: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous kv-head ranges, one per worker, sizes differing by at most one (3 over 2: 2 + 1)."""
    if not 1 <= workers <= kv_heads:
        raise ValueError(f"--attention-workers must be between 1 and the model's {kv_heads} kv heads, got {workers}")
    base, extra = divmod(kv_heads, workers)
    out, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def shard(x: np.ndarray, role: str, kv_heads: int, heads: tuple[int, int]) -> np.ndarray:
    """A worker's part of one attention input, its kv heads folded into the batch axis:
    [b, kv_heads*g, ...] -> [b*m, g, ...] for the m heads in ``heads``; ``other`` inputs whole."""
    if role not in ("q", "kv"):
        return x
    a, b = heads
    rows, per = x.shape[0], x.shape[1] // kv_heads
    return np.ascontiguousarray(x.reshape(rows, kv_heads, per, *x.shape[2:])[:, a:b].reshape(rows * (b - a), per, *x.shape[2:]))


def merge(parts: list[np.ndarray], rows: int) -> np.ndarray:
    """Inverse of ``shard`` for outputs: per-worker [rows*m, g, ...] back to [rows, heads, ...]."""
    views = [p.reshape(rows, -1, *p.shape[2:]) for p in parts]
    return views[0] if len(views) == 1 else np.concatenate(views, axis=1)


def shard_shape(full: tuple[int, ...], kv_heads: int, heads: tuple[int, int]) -> tuple[int, ...]:
    m = heads[1] - heads[0]
    return (full[0] * m, full[1] // kv_heads, *full[2:])


def pack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays as one byte buffer (one message per layer and worker instead of one per tensor)."""
    parts = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def packed_size(specs: Sequence[tuple[tuple[int, ...], str]]) -> int:
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for shape, dtype in specs)


def unpack(buffer: np.ndarray, specs: Sequence[tuple[tuple[int, ...], str]]) -> list[np.ndarray]:
    """Inverse of ``pack`` for arrays of these (shape, dtype)s."""
    out, at = [], 0
    for shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        out.append(buffer[at:at + n].view(dtype).reshape(shape))
        at += n
    return out
