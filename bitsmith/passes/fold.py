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
from bitsmith.ir.traits import PURE, SOURCE, has_trait

from .base import Pass, register_pass
from .rewrite import Pattern, Rewriter, apply_patterns


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


def _run_rule(node: Node, inputs: list[np.ndarray], ctx: EvalContext) -> list[np.ndarray] | None:
    """The node's output values by the interpreter's rule, or None when it cannot run here
    (e.g. a symbolic slice bound, a bad token id)."""
    try:
        with np.errstate(all="ignore"):
            values = RULES[node.op](inputs, node, ctx)
    except (InterpreterError, SymbolicDimError):
        return None
    return [np.asarray(v) for v in values]


@register_pass
@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Folds nodes with all-constant inputs whose (static) results hold at most
    ``max_elements`` elements, so e.g. an ``expand`` of a constant to a huge shape stays.
    Source nodes (constants, scalars, a static ``arange``) give known values but stay:
    they are cheaper to keep than to store again."""

    name = "fold"
    idempotent = True
    max_elements: int = 1 << 20

    def apply(self, module: Module) -> Module:
        ctx = EvalContext(module, {})  # no bindings: anything symbolic is left for run time

        def known(value: str, rw: Rewriter) -> np.ndarray | None:
            """The value, when it is a source's output (memoized per function)."""
            if value not in rw.memo:
                node = rw.producer(value)
                if node is None:  # a parameter
                    rw.memo[value] = None
                    return None
                values = None
                if has_trait(node.op, SOURCE) and node.op in RULES:
                    values = _run_rule(node, [], ctx)
                for k, o in enumerate(node.outputs):
                    rw.memo[o.name] = None if values is None else values[k]
            return rw.memo[value]

        def from_source(value: str, rw: Rewriter) -> bool:
            node = rw.producer(value)
            return node is not None and has_trait(node.op, SOURCE)

        def foldable(node: Node, rw: Rewriter) -> bool:
            # types and producers first: a source's data is read only when every input is one
            size = _static_size(node)
            return (bool(node.inputs) and has_trait(node.op, PURE) and node.op in RULES and size is not None
                    and size <= self.max_elements and all(from_source(i, rw) for i in node.inputs)
                    and all(known(i, rw) is not None for i in node.inputs))

        def fold(node: Node, rw: Rewriter) -> None:
            values = _run_rule(node, [known(i, rw) for i in node.inputs], ctx)  # type: ignore[misc]
            if values is None:
                return
            replacement = []
            for out, value in zip(node.outputs, values):
                rw.memo[out.name] = value
                if value.ndim == 0:
                    attrs = freeze_attrs({"value": value.item(), "dtype": out.type.dtype})
                    replacement.append(Node("scalar", (), (out,), attrs, node.loc))
                    continue
                tname = folded_tensor_name(value)
                if not rw.has_tensor(tname):  # equal results share one entry
                    rw.add_tensor(tname, value)
                replacement.append(Node("constant", (), (out,), freeze_attrs({"name": tname}), node.loc))
            rw.replace(*replacement)

        return apply_patterns(module, [Pattern(fold, where=foldable, name="fold")])
