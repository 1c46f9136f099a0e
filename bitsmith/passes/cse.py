"""Common-subexpression elimination: merge pure nodes computing the same value.

Two nodes merge when op, (renamed) inputs, attributes and output types are equal; two
``constant`` nodes of one tensor-table name therefore merge too. The first occurrence, with
its location, stays; later uses are renamed to it. One walk in program order suffices: a
node's inputs are renamed before the walk reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

from bitsmith.ir import Module, Node
from bitsmith.ir.traits import PURE

from .base import Pass, register_pass
from .rewrite import Rewriter, apply_patterns, pattern


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


@pattern(trait=PURE)
def merge_duplicate(node: Node, rw: Rewriter) -> None:
    first = rw.memo.setdefault(_node_key(node), node.outputs)
    if first is not node.outputs:
        rw.replace_with_values(*(o.name for o in first))


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    name = "cse"
    idempotent = True

    def apply(self, module: Module) -> Module:
        return apply_patterns(module, [merge_duplicate], once=True)
