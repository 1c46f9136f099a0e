"""Which ``linear`` nodes a weight pass rewrites, and the bookkeeping of rewriting them:
layer selection by module path, the constant weight behind a node, fresh value and tensor
names, and the final clean-up of weights nothing uses any more."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import numpy as np

from bitsmith.ir import Function, Module, Node, Value
from bitsmith.ir.types import TensorType, dtype_of_numpy

from ..base import map_functions
from ..dce import eliminate_dead_nodes

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
    weight: np.ndarray  # [out, in], read-only
    weight_loc: object  # the constant node's location

    @property
    def module_path(self) -> str:
        return self.node.loc.module_path if self.node.loc else ""


def linear_site(node: Node, producers: dict[str, Node], module: Module,
                layers: tuple[str, ...]) -> LinearSite | None:
    if node.op != "linear" or not is_selected(node, layers):
        return None
    producer = producers.get(node.inputs[1])
    if producer is None or producer.op != "constant":
        return None
    name = producer.attr("name")
    weight = module.tensors[name]
    if weight.dtype.kind != "f" or weight.ndim != 2:
        return None
    return LinearSite(node, name, weight, producer.loc)


class Names:
    """Fresh SSA value names in one function."""

    def __init__(self, fn: Function) -> None:
        self.used = {p.name for p in fn.params} | {o.name for n in fn.nodes for o in n.outputs}

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self.used:
            i += 1
            name = f"{hint}.{i}"
        self.used.add(name)
        return name


class NewTensors:
    """Tensors a pass adds to the table, named after the weight they come from.

    ``prefix(base, key)`` gives ``base`` the first time and the same prefix again for the same
    key (a weight shared by several nodes is converted once); a different key on the same base
    (e.g. the same weight with another annotation) gets ``base#1``, ``base#2``, ...
    """

    def __init__(self, module: Module) -> None:
        self.existing = set(module.tensors)
        self.tensors: dict[str, np.ndarray] = {}
        self.prefixes: dict[Hashable, str] = {}
        self.taken: set[str] = set()

    def prefix(self, base: str, key: Hashable, suffixes: Iterable[str]) -> tuple[str, bool]:
        """(prefix, already made) for ``key``; ``suffixes`` are the names it will add."""
        if key in self.prefixes:
            return self.prefixes[key], True
        suffixes = tuple(suffixes)
        candidate, i = base, 0
        while candidate in self.taken or any(candidate + s in self.existing for s in suffixes):
            i += 1
            candidate = f"{base}#{i}"
        self.taken.add(candidate)
        self.prefixes[key] = candidate
        return candidate, False

    def add(self, name: str, array: np.ndarray) -> None:
        self.tensors[name] = array

    def type_of(self, name: str) -> TensorType:
        a = self.tensors[name]
        return TensorType(tuple(a.shape), dtype_of_numpy(a.dtype))

    def into(self, module: Module) -> Module:
        return module.replace(tensors=module.tensors.with_tensors(self.tensors)) if self.tensors else module


def constant_node(names: Names, tensors: NewTensors, tensor: str, hint: str, loc: object) -> Node:
    """A ``constant`` node for a tensor added to ``tensors``, its value named after ``hint``."""
    value = names.fresh(hint)
    return Node("constant", (), (Value(value, tensors.type_of(tensor)),), {"name": tensor}, loc)


def rewrite_linears(module: Module, layers: tuple[str, ...],
                    rewrite: Callable[[LinearSite, Names], list[Node] | None]) -> Module:
    """Replaces each selected linear with the nodes ``rewrite`` returns (None: keep it), then
    drops dead nodes and tensors no constant refers to any more."""
    functions = []
    for fn in module.functions:
        producers = fn.producers()
        names = Names(fn)
        nodes: list[Node] = []
        for node in fn.nodes:
            site = linear_site(node, producers, module, layers)
            new = rewrite(site, names) if site is not None else None
            nodes.extend([node] if new is None else new)
        functions.append(fn.replace(nodes=tuple(nodes)))
    return module.replace(functions=tuple(functions))


def drop_dead(module: Module) -> Module:
    return map_functions(module, eliminate_dead_nodes).prune_tensors()
