"""GraphBuilder: appends nodes with inferred types and fresh SSA names."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .graph import Function, Location, Module, Node, TensorTable, Value, freeze_attrs
from .ops import get_op
from .types import IRTypeError, TensorType, dtype_of_numpy


class GraphBuilder:
    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.params: list[Value] = []
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self.tensors: dict[str, np.ndarray] = {}
        self._counter = 0

    def fresh(self, hint: str = "v") -> str:
        while True:
            name = f"{hint}{self._counter}"
            self._counter += 1
            if name not in self.types:
                return name

    def param(self, name: str, type: TensorType) -> str:
        if name in self.types:
            raise ValueError(f"value %{name} already defined")
        self.params.append(Value(name, type))
        self.types[name] = type
        return name

    def op(self, op: str, inputs: tuple[str, ...] | list[str] = (), attrs: Mapping[str, Any] | None = None,
           loc: Location | None = None, name: str | None = None) -> str:
        """Appends one single-output node and returns its value name."""
        frozen = freeze_attrs(attrs)
        opdef = get_op(op)
        if opdef.infer is None:
            raise IRTypeError(f"{op} has no inferred type; use a dedicated builder method")
        (out_type,) = opdef.infer(tuple(self.types[i] for i in inputs), dict(frozen))
        out = name or self.fresh()
        self.nodes.append(Node(op, tuple(inputs), (Value(out, out_type),), frozen, loc))
        self.types[out] = out_type
        return out

    def constant(self, tensor_name: str, array: np.ndarray, loc: Location | None = None) -> str:
        array = np.require(array, requirements="C")  # ascontiguousarray would make 0-d arrays 1-d
        if tensor_name in self.tensors and self.tensors[tensor_name] is not array:
            raise ValueError(f"tensor {tensor_name!r} added twice with different data")
        self.tensors[tensor_name] = array
        t = TensorType(tuple(array.shape), dtype_of_numpy(array.dtype))
        out = self.fresh()
        self.nodes.append(Node("constant", (), (Value(out, t),), freeze_attrs({"name": tensor_name}), loc))
        self.types[out] = t
        return out

    def declare_constant(self, tensor_name: str, t: TensorType, loc: Location | None = None) -> str:
        """A ``constant`` node for a tensor whose data the caller's table supplies (not ``self.tensors``)."""
        out = self.fresh()
        self.nodes.append(Node("constant", (), (Value(out, t),), freeze_attrs({"name": tensor_name}), loc))
        self.types[out] = t
        return out

    def scalar(self, value: float | int | bool, dtype: str) -> str:
        return self.op("scalar", (), {"value": value, "dtype": dtype})

    def function(self, results: list[str] | tuple[str, ...]) -> Function:
        return Function(self.name, tuple(self.params), tuple(self.nodes), tuple(results))

    def module(self, results: list[str] | tuple[str, ...], attrs: Mapping[str, Any] | None = None) -> Module:
        return Module((self.function(results),), TensorTable(self.tensors), freeze_attrs(attrs))
