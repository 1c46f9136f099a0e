"""Common-subexpression elimination: merge nodes computing the same value.

Two nodes merge when op, (renamed) inputs, attributes and output types are equal; two
``constant`` nodes of one tensor-table name therefore merge too. The first occurrence, with
its location, stays; later uses are renamed to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from bitsmith.ir import Function, Module, Node

from .base import Pass, map_functions, register_pass


def _exact(value: object) -> Hashable:
    """A key that tells apart attribute values Python calls equal but that compute
    differently: 0.0 vs -0.0, 1 vs 1.0 vs True (and makes NaN equal to itself)."""
    if isinstance(value, tuple):
        return tuple(_exact(v) for v in value)
    if isinstance(value, float):
        return ("float", value.hex())
    return (type(value).__name__, value)


def _node_key(node: Node) -> Hashable:
    return (node.op, node.inputs, _exact(node.attrs), tuple(o.type for o in node.outputs))


def eliminate_common_subexpressions(fn: Function) -> Function:
    rename: dict[str, str] = {}
    seen: dict[Hashable, Node] = {}
    nodes = []
    for node in fn.nodes:
        node = node.replace(inputs=tuple(rename.get(i, i) for i in node.inputs))
        first = seen.setdefault(_node_key(node), node)
        if first is node:
            nodes.append(node)
        else:
            rename.update((o.name, f.name) for o, f in zip(node.outputs, first.outputs))
    results = tuple(rename.get(r, r) for r in fn.results)
    return fn.replace(nodes=tuple(nodes), results=results)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"

    def apply(self, module: Module) -> Module:
        return map_functions(module, eliminate_common_subexpressions)
