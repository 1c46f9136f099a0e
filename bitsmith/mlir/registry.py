"""Which bitsmith ops export to upstream dialects: a table of emitters keyed by op name.

An emitter appends the ops for one node through a ``FunctionEmitter`` and returns the SSA
value of the op that defines the node's output; ``export.py`` tags that op. Ops without an
emitter here are exported as generic ``bitsmith.<op>`` operations (``dialect_ops.py``).
"""

from __future__ import annotations

from typing import Callable

from ..ir.graph import Node
from .emitter import FunctionEmitter

Emitter = Callable[[FunctionEmitter, Node], str]
EMITTERS: dict[str, Emitter] = {}


def emits(*ops: str) -> Callable[[Emitter], Emitter]:
    def deco(fn: Emitter) -> Emitter:
        for op in ops:
            if op in EMITTERS:
                raise ValueError(f"MLIR emitter for {op!r} registered twice")
            EMITTERS[op] = fn
        return fn
    return deco


def standard_ops() -> frozenset[str]:
    """The ops exported to func/arith/math/linalg/tensor (after the emitter modules loaded)."""
    from . import elementwise, movement, structured  # noqa: F401  (they register on import)
    return frozenset(EMITTERS)
