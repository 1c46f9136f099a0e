"""Grouping of fusible nodes into kernels, in an order the executor can run.

Nodes are visited in topological order. Anchor nodes (matmuls, attention, embedding) are
steps of their own. A fusible node joins the group of its latest-scheduled producer when
all its other inputs exist before that group runs; if its latest producer is an anchor
scheduled after a producer group that no later step reads yet, that group is moved after
the anchor and the node joins it (so ``silu(gate) * up`` is one kernel). Otherwise the node
starts a new group. Groups are therefore always executable in step order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...ir.graph import Function, Node


@dataclass
class Step:
    """One executor step: an anchor node, or a group of fusible nodes."""

    nodes: list[Node]
    anchor: bool

    def produced(self) -> set[str]:
        return {o.name for n in self.nodes for o in n.outputs}

    def consumed(self) -> set[str]:
        return {i for n in self.nodes for i in n.inputs}


def group_nodes(fn: Function, is_anchor: Callable[[Node], bool], is_source: Callable[[Node], bool]) -> list[Step]:
    """Steps in execution order. ``is_source`` nodes (constants, scalars) belong to no step."""
    steps: list[Step] = []
    where: dict[str, Step] = {}  # value name -> producing step

    def pos(s: Step) -> int:
        return next(k for k, x in enumerate(steps) if x is s)

    for node in fn.nodes:
        if is_source(node):
            continue
        producers = {id(where[i]): where[i] for i in node.inputs if i in where}
        target: Step | None = None
        if not is_anchor(node) and producers:
            ordered = sorted(producers.values(), key=pos)
            latest = ordered[-1]
            if not latest.anchor:
                target = latest
            else:
                groups = [s for s in ordered if not s.anchor]
                if groups:
                    cand = groups[-1]
                    p = pos(cand)
                    produced = cand.produced()
                    later_reads = any(produced & s.consumed() for s in steps[p + 1:])
                    if not later_reads:  # moving it after the anchors changes nothing they see
                        steps.remove(cand)
                        steps.append(cand)
                        target = cand
        if target is None:
            target = Step([], is_anchor(node))
            steps.append(target)
        target.nodes.append(node)
        for o in node.outputs:
            where[o.name] = target
    return steps
