"""Local rewrites: patterns keyed by op (or trait) and the driver that applies a pattern set
to every function of a module, once or to a fixed point.

A pattern names the ops it looks at (op names, or a trait from ``bitsmith.ir.traits``), an
optional predicate, and a ``rewrite(node, rw)`` function that edits the graph through the
:class:`~bitsmith.passes.rewriter.Rewriter` (fresh names, producers and users, new constants,
insertion before the matched node, replacement, replace-all-uses, erasure). IR nodes stay
immutable; the driver returns new Function and Module objects, and a fixed-point run
revisits only the nodes an edit touched (no rescans of the function).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterable

from bitsmith.ir import Module, Node
from bitsmith.ir.ops import OPS
from bitsmith.ir.traits import ALL_TRAITS, has_trait

from .rewriter import RewriteError, RewriteLimitError, Rewriter, TensorBook

__all__ = ["Pattern", "PatternSet", "Predicate", "RewriteError", "RewriteFn", "RewriteLimitError", "Rewriter",
           "apply_patterns", "pattern"]

RewriteFn = Callable[[Node, "Rewriter"], None]
Predicate = Callable[[Node, "Rewriter"], bool]


@dataclass(frozen=True)
class Pattern:
    """``rewrite(node, rw)`` for nodes whose op is in ``ops`` (or declares ``trait``; neither:
    every node) and for which ``where(node, rw)`` holds. It edits through ``rw``; doing
    nothing means it did not apply."""

    rewrite: RewriteFn
    ops: frozenset[str] = frozenset()
    trait: str | None = None
    where: Predicate | None = None
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", frozenset(self.ops))
        if self.ops and self.trait is not None:
            raise ValueError(f"pattern {self.label}: give op names or a trait, not both")
        unknown = sorted(op for op in self.ops if op not in OPS)  # a misspelt op would never match
        if unknown:
            raise ValueError(f"pattern {self.label}: unknown ops {unknown}")
        if self.trait is not None and self.trait not in ALL_TRAITS:
            raise ValueError(f"pattern {self.label}: unknown trait {self.trait!r}; known: {sorted(ALL_TRAITS)}")

    @property
    def label(self) -> str:
        return self.name or getattr(self.rewrite, "__name__", repr(self.rewrite))

    def looks_at(self, op: str) -> bool:
        if self.ops:
            return op in self.ops
        return self.trait is None or has_trait(op, self.trait)


def pattern(*ops: str, trait: str | None = None, where: Predicate | None = None,
            name: str = "") -> Callable[[RewriteFn], Pattern]:
    """Decorator: ``@pattern("linear", where=selected)`` turns a rewrite function into a Pattern."""
    def deco(fn: RewriteFn) -> Pattern:
        return Pattern(fn, frozenset(ops), trait, where, name or fn.__name__)
    return deco


class PatternSet:
    """Patterns in priority order, indexed by op name so a node meets only the patterns that
    look at its op (the index fills lazily: ops may be registered after the set is built)."""

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        self.patterns = tuple(patterns)
        self._by_op: dict[str, tuple[Pattern, ...]] = {}

    def for_op(self, op: str) -> tuple[Pattern, ...]:
        found = self._by_op.get(op)
        if found is None:
            found = self._by_op[op] = tuple(p for p in self.patterns if p.looks_at(op))
        return found


def apply_patterns(module: Module, patterns: Iterable[Pattern] | PatternSet, *, once: bool = False,
                   remove_dead: bool = False, max_rewrites: int | None = None,
                   functions: Collection[str] | None = None) -> Module:
    """Applies ``patterns`` to every node of every function (or of ``functions``).

    Each node meets the patterns that look at its op in order; the first that edits wins.
    ``once``: every node present at the start is visited once, in program order, as it is
    when the walk reaches it; nodes the edits create are not visited. Otherwise the run goes on
    until no pattern applies: an edit puts the nodes it touched (new and changed nodes, users
    of a replaced node, producers of an erased node's inputs) back on the work list, and more
    than ``max_rewrites`` edits in one function (default: 8 per node + 64) raise
    RewriteLimitError. ``remove_dead`` then erases pure nodes nothing uses. Tensors the
    patterns added join the table; none are removed (``Module.prune_tensors`` does that).
    """
    pset = patterns if isinstance(patterns, PatternSet) else PatternSet(patterns)
    book = TensorBook(module)
    out = []
    for fn in module.functions:
        if functions is not None and fn.name not in functions:
            out.append(fn)
            continue
        rw = Rewriter(fn, module, book)
        if pset.patterns:
            limit = None if once else (max_rewrites if max_rewrites is not None else 8 * len(fn.nodes) + 64)
            rw._run(pset, once, limit)
        if remove_dead:
            rw._remove_dead()
        out.append(rw._function(fn))
    if not book.added and all(a is b for a, b in zip(out, module.functions)):
        return module
    tensors = module.tensors.with_tensors(book.added) if book.added else module.tensors
    return module.replace(functions=tuple(out), tensors=tensors)
