"""The IR's data structures: immutable SSA values, nodes, functions and modules.

Everything here is a frozen dataclass; a pass builds new nodes with ``.replace()`` and a new
function with ``Function.replace(nodes=...)`` instead of mutating shared state.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np

from .types import TensorType, dtype_of_numpy, numpy_dtype

# Attribute values are small immutable literals; tensors never appear inline.
AttrValue = Union[None, bool, int, float, str, tuple]


def freeze_attrs(attrs: Mapping[str, Any] | Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, AttrValue], ...]:
    items = dict(attrs or {})
    out = []
    for key in sorted(items):
        out.append((key, _freeze_value(items[key], key)))
    return tuple(out)


def _freeze_value(v: Any, key: str) -> AttrValue:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return tuple(_freeze_value(x, key) for x in v)
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"attribute {key!r}: unsupported value {v!r} ({type(v).__name__})")


@dataclass(frozen=True)
class Location:
    """Where a node came from in the user's model: module path and source line."""

    module_path: str = ""
    source: str = ""

    def __str__(self) -> str:
        parts = [p for p in (self.module_path, self.source) if p]
        return " at ".join(parts) if parts else "<unknown>"


@dataclass(frozen=True)
class Value:
    name: str
    type: TensorType


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    loc: Location | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        if not isinstance(self.attrs, tuple) or any(not isinstance(a, tuple) for a in self.attrs):
            object.__setattr__(self, "attrs", freeze_attrs(self.attrs))

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def attr_dict(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def replace(self, **changes: Any) -> "Node":
        if "attrs" in changes and not isinstance(changes["attrs"], tuple):
            changes["attrs"] = freeze_attrs(changes["attrs"])
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Function:
    """One SSA graph: typed parameters, nodes in topological order, named results.

    ``attrs`` are small literals about the whole function that passes and backends read, such
    as ``device = "attention"`` on a sub-function the ``partition`` pass outlined.
    """

    name: str
    params: tuple[Value, ...]
    nodes: tuple[Node, ...]
    results: tuple[str, ...]
    attrs: tuple[tuple[str, AttrValue], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.attrs, tuple) or any(not isinstance(a, tuple) for a in self.attrs):
            object.__setattr__(self, "attrs", freeze_attrs(self.attrs))

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        return dict(self.attrs).get(key, default)

    def replace(self, **changes: Any) -> "Function":
        if "attrs" in changes and not isinstance(changes["attrs"], tuple):
            changes["attrs"] = freeze_attrs(changes["attrs"])
        return dataclasses.replace(self, **changes)

    def value_types(self) -> dict[str, TensorType]:
        types = {p.name: p.type for p in self.params}
        for n in self.nodes:
            for o in n.outputs:
                types[o.name] = o.type
        return types

    def result_types(self) -> tuple[TensorType, ...]:
        types = self.value_types()
        return tuple(types[r] for r in self.results)

    def producers(self) -> dict[str, Node]:
        return {o.name: n for n in self.nodes for o in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i, []).append(n)
        return out


def sha256_of(array: np.ndarray) -> str:
    # hash the buffer in place: .tobytes() would copy every weight once more
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return hashlib.sha256(memoryview(flat)).hexdigest()


@dataclass(frozen=True)
class TensorInfo:
    """What the text form and the manifest say of a constant: never its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sha256: str


class TensorTable(Mapping[str, np.ndarray]):
    """Named constant tensors, read-only. Equality compares names, shapes, dtypes and hashes.

    ``known``: a table whose entries holding the very same (read-only) array objects lend their
    info, so deriving a table (``with_tensors``, ``subset``: every weight rewrite, every probe
    or segment) hashes only the new arrays, not the whole model again."""

    def __init__(self, tensors: Mapping[str, np.ndarray] | None = None,
                 known: "TensorTable | None" = None) -> None:
        self._data: dict[str, np.ndarray] = {}
        self._info: dict[str, TensorInfo] = {}
        for name, arr in (tensors or {}).items():
            arr = np.require(arr, requirements="C")  # keeps 0-d arrays 0-d
            dtype_of_numpy(arr.dtype)  # refuses dtypes the IR cannot type
            arr.setflags(write=False)
            self._data[name] = arr
            if known is not None and known._data.get(name) is arr:
                self._info[name] = known._info[name]
            else:
                self._info[name] = TensorInfo(name, tuple(arr.shape), dtype_of_numpy(arr.dtype), sha256_of(arr))

    def __getitem__(self, name: str) -> np.ndarray:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def infos(self) -> tuple[TensorInfo, ...]:
        return tuple(self._info[n] for n in sorted(self._info))

    def with_tensors(self, extra: Mapping[str, np.ndarray]) -> "TensorTable":
        merged = dict(self._data)
        merged.update(extra)
        return TensorTable(merged, known=self)

    def subset(self, names: Iterable[str]) -> "TensorTable":
        keep = set(names)
        return TensorTable({n: a for n, a in self._data.items() if n in keep}, known=self)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._data.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorTable) and self.infos() == other.infos()

    def __hash__(self) -> int:
        return hash(self.infos())

    def __repr__(self) -> str:
        return f"TensorTable({len(self)} tensors, {self.nbytes()} bytes)"


@dataclass(frozen=True)
class Module:
    """Functions plus the tensor table their ``constant`` nodes point into.

    ``attrs`` carries model-level facts the runtime needs (for a language model: its kind,
    KV-cache layout, token ids), as small literals.
    """

    functions: tuple[Function, ...]
    tensors: TensorTable = field(default_factory=TensorTable)
    attrs: tuple[tuple[str, AttrValue], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "functions", tuple(self.functions))
        if not isinstance(self.attrs, tuple) or any(not isinstance(a, tuple) for a in self.attrs):
            object.__setattr__(self, "attrs", freeze_attrs(self.attrs))

    def function(self, name: str) -> Function:
        for f in self.functions:
            if f.name == name:
                return f
        raise KeyError(f"module has no function {name!r}; it has {[f.name for f in self.functions]}")

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        return dict(self.attrs).get(key, default)

    def replace(self, **changes: Any) -> "Module":
        if "attrs" in changes and not isinstance(changes["attrs"], tuple):
            changes["attrs"] = freeze_attrs(changes["attrs"])
        return dataclasses.replace(self, **changes)

    def with_function(self, fn: Function) -> "Module":
        names = [f.name for f in self.functions]
        if fn.name in names:
            funcs = tuple(fn if f.name == fn.name else f for f in self.functions)
        else:
            funcs = self.functions + (fn,)
        return self.replace(functions=funcs)

    def used_constants(self) -> set[str]:
        return {n.attr("name") for f in self.functions for n in f.nodes if n.op == "constant"}

    def prune_tensors(self) -> "Module":
        """Drop tensor-table entries no ``constant`` node refers to."""
        return self.replace(tensors=self.tensors.subset(self.used_constants()))


def constant_type(info: TensorInfo) -> TensorType:
    return TensorType(info.shape, info.dtype)


def as_numpy(array: Any, dtype: str) -> np.ndarray:
    return np.asarray(array, dtype=numpy_dtype(dtype))
