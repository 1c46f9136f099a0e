"""Which ``linear`` nodes a weight pass rewrites: layer selection by module path and the
constant weight behind a node. The passes (``quantize``, ``sparsify``, ``outliers``) are
patterns on ``linear`` run by the rewrite driver (``bitsmith.passes.rewrite``)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from bitsmith.ir import Module, Node, TensorType
from bitsmith.ir.types import FLOAT_DTYPES

from ..rewrite import Pattern, Predicate, Rewriter, RewriteFn, apply_patterns

DEFAULT_EXCLUDED = ("*lm_head",)  # the output projection stays in full precision by default


def normalize_layers(layers: str | Iterable[str] | None) -> tuple[str, ...]:
    """``layers`` as a tuple of globs; a string (from a pass spec) is split on spaces, ``;``
    and ``|`` (a ``,`` would end the pass's option list)."""
    if layers is None:
        return ()
    if isinstance(layers, str):
        return tuple(p for p in re.split(r"[\s;|]+", layers) if p)
    return tuple(str(p) for p in layers)


def is_selected(node: Node, layers: tuple[str, ...]) -> bool:
    """``layers`` globs match the node's module path; no globs selects every linear except the
    ones whose module path ends in ``lm_head``."""
    path = node.loc.module_path if node.loc else ""
    if layers:
        return any(fnmatch.fnmatchcase(path, g) for g in layers)
    return not any(fnmatch.fnmatchcase(path, g) for g in DEFAULT_EXCLUDED)


@dataclass(frozen=True)
class LinearSite:
    """A selected ``linear`` node whose weight is a table constant."""

    node: Node
    weight_name: str  # its tensor-table name
    weight_type: TensorType  # [out, in], a float dtype
    weight_loc: object  # the constant node's location
    rewriter: Rewriter = field(repr=False, compare=False)

    @property
    def weight(self) -> np.ndarray:
        """The weight's data, read only when a pass needs it (``outliers`` only annotates)."""
        return self.rewriter.tensor(self.weight_name)

    @property
    def module_path(self) -> str:
        return self.node.loc.module_path if self.node.loc else ""


def linear_site(node: Node, rw: Rewriter) -> LinearSite | None:
    """The site of a ``linear`` whose weight is a 2-D float table constant, else None."""
    producer = rw.producer(node.inputs[1])
    if producer is None or producer.op != "constant":
        return None
    name = producer.attr("name")
    weight_type = rw.tensor_type(name)
    if weight_type.dtype not in FLOAT_DTYPES or weight_type.rank != 2:
        return None
    return LinearSite(node, name, weight_type, producer.loc, rw)


def selected_linear_inputs(module: Module, layers: tuple[str, ...], function: str = "main") -> list[str]:
    """The distinct values feeding the ``linear`` nodes ``layers`` selects, in node order."""
    fn = module.function(function)
    return list(dict.fromkeys(n.inputs[0] for n in fn.nodes if n.op == "linear" and is_selected(n, layers)))


def rewrite_selected_linears(module: Module, layers: tuple[str, ...], rewrite: RewriteFn, name: str) -> Module:
    """Runs ``rewrite`` once on each ``linear`` that ``layers`` selects, then drops the nodes
    and tensors (old weights) nothing uses any more."""
    selected: Predicate = lambda node, rw: is_selected(node, layers)  # noqa: E731
    applied = apply_patterns(module, [Pattern(rewrite, frozenset({"linear"}), where=selected, name=name)],
                             once=True, remove_dead=True)
    return applied.prune_tensors()
