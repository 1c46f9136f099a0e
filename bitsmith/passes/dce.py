"""Dead-code elimination: drop nodes no function result depends on, then unused tensors."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Function, Module

from .base import Pass, map_functions, register_pass


def eliminate_dead_nodes(fn: Function) -> Function:
    """Keeps a node iff one of its outputs is a result or feeds a kept node (IR ops are pure)."""
    live = set(fn.results)
    kept = []
    for node in reversed(fn.nodes):
        if any(o.name in live for o in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    return fn.replace(nodes=tuple(reversed(kept)))


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"

    def apply(self, module: Module) -> Module:
        return map_functions(module, eliminate_dead_nodes).prune_tensors()
