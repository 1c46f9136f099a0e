"""Constant folding: evaluate nodes whose inputs are all known, with the interpreter's rules.

A folded node keeps its output name and location and becomes a ``constant`` node pointing at
a new tensor-table entry named ``folded.<sha256 prefix>`` (hash of dtype, shape and bytes, so
equal results share one entry), or a ``scalar`` node when the result is rank 0. The same numpy
rules the reference interpreter runs compute the value, so folding is bitwise exact.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from bitsmith.ir import Module, Node
from bitsmith.ir.graph import freeze_attrs
from bitsmith.ir.interpreter import RULES, EvalContext, InterpreterError
from bitsmith.ir.symbolic import SymbolicDimError

from .base import Pass, register_pass

SOURCE_OPS = frozenset({"constant", "scalar"})


def folded_tensor_name(array: np.ndarray) -> str:
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return f"folded.{h.hexdigest()[:16]}"


def _static_size(node: Node) -> int | None:
    """Elements of all outputs together, or None when some dim is symbolic."""
    total = 0
    for o in node.outputs:
        if not all(isinstance(d, int) for d in o.type.shape):
            return None
        total += math.prod(o.type.shape)
    return total


@register_pass
@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Folds nodes with all-constant inputs whose (static) results hold at most
    ``max_elements`` elements, so e.g. an ``expand`` of a constant to a huge shape stays."""

    name = "fold"
    max_elements: int = 1 << 20

    def apply(self, module: Module) -> Module:
        ctx = EvalContext(module, {})  # no bindings: anything symbolic is left for run time
        new_tensors: dict[str, np.ndarray] = {}
        functions = []
        for fn in module.functions:
            known: dict[str, np.ndarray] = {}
            nodes: list[Node] = []
            for node in fn.nodes:
                values = self._evaluate(node, known, ctx)
                if values is None:
                    nodes.append(node)
                    continue
                known.update((o.name, v) for o, v in zip(node.outputs, values))
                if node.op in SOURCE_OPS:
                    nodes.append(node)
                    continue
                for out, value in zip(node.outputs, values):
                    if value.ndim == 0:
                        nodes.append(Node("scalar", (), (out,), freeze_attrs(
                            {"value": value.item(), "dtype": out.type.dtype}), node.loc))
                    else:
                        tname = folded_tensor_name(value)
                        if tname not in module.tensors:
                            new_tensors[tname] = value
                        nodes.append(Node("constant", (), (out,), freeze_attrs({"name": tname}), node.loc))
            functions.append(fn.replace(nodes=tuple(nodes)))
        tensors = module.tensors.with_tensors(new_tensors) if new_tensors else module.tensors
        return module.replace(functions=tuple(functions), tensors=tensors)

    def _evaluate(self, node: Node, known: dict[str, np.ndarray], ctx: EvalContext) -> list[np.ndarray] | None:
        """The node's output values, or None when it cannot or should not be folded."""
        rule = RULES.get(node.op)
        if rule is None or not all(i in known for i in node.inputs):
            return None
        if node.op not in SOURCE_OPS:
            if not node.inputs:  # other sources (arange) are cheaper to recompute than to store
                return None
            size = _static_size(node)
            if size is None or size > self.max_elements:
                return None
        try:
            with np.errstate(all="ignore"):
                values = rule([known[i] for i in node.inputs], node, ctx)
        except (InterpreterError, SymbolicDimError):  # e.g. a symbolic slice bound, a bad token id
            return None
        return [np.asarray(v) for v in values]
