"""Dead-code elimination: drop pure nodes no function result depends on, then unused tensors."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Module

from .base import Pass, register_pass
from .rewrite import apply_patterns


def drop_dead(module: Module) -> Module:
    """Erases pure nodes nothing uses (transitively), then tensors no constant refers to."""
    return apply_patterns(module, (), remove_dead=True).prune_tensors()


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    name = "dce"
    idempotent = True

    def apply(self, module: Module) -> Module:
        return drop_dead(module)
