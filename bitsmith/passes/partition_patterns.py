"""What the ``partition`` pass outlines: a table of named node predicates, extensible as data.

A pattern is a predicate over one node and an index of its function (producers, users,
parameters); the pass outlines the connected regions of matching nodes. Other modules add
entries with ``register_partition_pattern`` (an FPGA backend might register the ops its
fabric runs); ``trait_predicate`` turns an op trait into a predicate for ``trait=...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from bitsmith.errors import UnknownOptionError
from bitsmith.ir import Function, Node
from bitsmith.ir.traits import ALL_TRAITS, ATTENTION, has_trait


@dataclass(frozen=True)
class FunctionIndex:
    """What a predicate may ask about a node's neighbourhood in its function."""

    function: Function
    producers: Mapping[str, Node]
    users: Mapping[str, tuple[Node, ...]]
    params: frozenset[str]
    results: frozenset[str]

    @classmethod
    def of(cls, fn: Function) -> "FunctionIndex":
        users = {k: tuple(v) for k, v in fn.users().items()}
        return cls(fn, fn.producers(), users, frozenset(p.name for p in fn.params), frozenset(fn.results))


NodePredicate = Callable[[Node, FunctionIndex], bool]


@dataclass(frozen=True)
class PartitionPattern:
    name: str
    matches: NodePredicate
    doc: str


PARTITION_PATTERNS: dict[str, PartitionPattern] = {}


def register_partition_pattern(name: str, doc: str) -> Callable[[NodePredicate], NodePredicate]:
    """Decorator: adds a predicate to the table under ``name`` (``partition{pattern=name}``)."""
    def deco(fn: NodePredicate) -> NodePredicate:
        if name in PARTITION_PATTERNS:
            raise ValueError(f"partition pattern {name!r} registered twice")
        PARTITION_PATTERNS[name] = PartitionPattern(name, fn, doc)
        return fn
    return deco


def get_partition_pattern(name: str) -> PartitionPattern:
    if name not in PARTITION_PATTERNS:
        raise UnknownOptionError("partition pattern", name, sorted(PARTITION_PATTERNS))
    return PARTITION_PATTERNS[name]


def trait_predicate(trait: str) -> NodePredicate:
    """Matches the nodes whose op declares ``trait`` (see ``bitsmith.ir.traits``)."""
    if trait not in ALL_TRAITS:
        raise UnknownOptionError("op trait", trait, sorted(ALL_TRAITS))
    return lambda node, index: has_trait(node.op, trait)


@register_partition_pattern("attention", "every op with the attention trait, alone")
def _attention(node: Node, index: FunctionIndex) -> bool:
    return has_trait(node.op, ATTENTION)


def _is_kv_append(node: Node, index: FunctionIndex) -> bool:
    """``concat(past, new)`` with ``past`` a parameter (the cache), read only by attention ops
    as their key or value (and perhaps returned as the new cache)."""
    if node.op != "concat" or not any(i in index.params for i in node.inputs):
        return False
    out = node.outputs[0].name
    readers = index.users.get(out, ())
    return bool(readers) and all(has_trait(r.op, ATTENTION) and out in r.inputs[1:] for r in readers)


@register_partition_pattern(
    "attention_kv", "attention ops with the KV-cache appends that feed them (concat of a cache "
    "parameter and the new keys or values): the part an attention device would own")
def _attention_kv(node: Node, index: FunctionIndex) -> bool:
    return has_trait(node.op, ATTENTION) or _is_kv_append(node, index)
