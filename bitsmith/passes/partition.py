"""Partitioning: outline the regions a predicate matches into sub-functions called from the caller.

On a function's data-flow graph (networkx): the matched nodes' weakly connected components are
the regions. Outlining a region contracts it to one call node, which must keep the graph
acyclic: when contracting every component at once would make a cycle (a path leaves a region
and comes back, or two regions feed each other), the regions are grown edge by edge instead,
merging two only when no other path joins them, so each stays connected and the result stays
a DAG. Each region becomes a function whose parameters are the values it reads from outside
(first use first) and whose results are the values it defines that anything outside reads,
that the caller returns, or that nothing reads (so no node is lost: ``inline`` restores the
original graph up to order and names). The caller keeps every value name; its nodes are
re-emitted in a topological order of the contracted graph that follows the original order.

Each callee carries function attributes: ``partition`` (the trait or pattern), the given
``device`` / ``codegen``, and ``cut_in_bytes`` / ``cut_out_bytes``: the bytes of its
parameters and results per call, an int or a symbolic expression over the caller's dims
(``"2304*batch*seq"``). ``cut_report`` gives the per-call view, with the topological
generation of each call (calls of one generation are independent of each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used (~0.1-0.3 s): only partitioning needs it
    import networkx as nx

from bitsmith.errors import PassError
from bitsmith.ir import Function, Module, Node, Value

from .base import Pass, register_pass
from .cut_report import PartitionReport, cut_report, data_flow_graph, total_bytes
from .partition_patterns import FunctionIndex, NodePredicate, get_partition_pattern, trait_predicate


def _quotient(g: nx.DiGraph, unit_of: dict[int, object]) -> nx.DiGraph:
    import networkx as nx
    q = nx.DiGraph()
    q.add_nodes_from(set(unit_of.values()))
    q.add_edges_from((unit_of[u], unit_of[v]) for u, v in g.edges if unit_of[u] != unit_of[v])
    return q


def _joined_elsewhere(q: nx.DiGraph, a: object, b: object) -> bool:
    """Whether a path of two or more edges runs between units a and b (either way)."""
    for src, dst in ((a, b), (b, a)):
        stack = [s for s in q.successors(src) if s != dst]
        seen = set(stack)
        while stack:
            u = stack.pop()
            if u == dst:
                return True
            for s in q.successors(u):
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
    return False


def _grow_regions(g: nx.DiGraph, components: list[set[int]]) -> list[set[int]]:
    """Splits components so that contracting every region keeps ``g`` acyclic: starts from
    single nodes and merges along matched edges while no other path joins the two sides."""
    import networkx as nx
    q = g.copy()
    rep = {i: i for c in components for i in c}
    members = {i: {i} for i in rep}
    changed = True
    while changed:
        changed = False
        for c in components:
            for u, v in sorted(g.subgraph(c).edges):
                a, b = rep[u], rep[v]
                if a == b or _joined_elsewhere(q, a, b):
                    continue
                nx.contracted_nodes(q, a, b, self_loops=False, copy=False)
                for i in members[b]:
                    rep[i] = a
                members[a] |= members.pop(b)
                changed = True
    return list(members.values())


def find_regions(fn: Function, matched: set[int]) -> list[list[int]]:
    """Regions (sorted node indices) to outline, ordered by their first node."""
    import networkx as nx
    g = data_flow_graph(fn)
    components = [set(c) for c in nx.weakly_connected_components(g.subgraph(matched))]
    unit_of: dict[int, object] = {i: i for i in g.nodes}
    for k, c in enumerate(components):
        unit_of.update({i: ("region", k) for i in c})
    if not nx.is_directed_acyclic_graph(_quotient(g, unit_of)):
        components = _grow_regions(g, components)
    return sorted(sorted(c) for c in components)


@dataclass(frozen=True)
class _Outlined:
    callee: Function
    call: Node


def _outline(fn: Function, region: list[int], name: str, attrs: dict, users: dict[str, list[Node]]) -> _Outlined:
    nodes = [fn.nodes[i] for i in region]
    inside = {id(n) for n in nodes}
    defined = {o.name for n in nodes for o in n.outputs}
    types = fn.value_types()
    inputs = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in defined))
    results = set(fn.results)
    outputs = [o for n in nodes for o in n.outputs
               if o.name in results or not users.get(o.name) or any(id(u) not in inside for u in users[o.name])]
    params = tuple(Value(v, types[v]) for v in inputs)
    callee_attrs = {**attrs, "cut_in_bytes": total_bytes(tuple(p.type for p in params)),
                    "cut_out_bytes": total_bytes(tuple(o.type for o in outputs))}
    callee = Function(name, params, tuple(nodes), tuple(o.name for o in outputs), callee_attrs)
    loc = next((n.loc for n in nodes if n.loc is not None), None)
    call = Node("call", tuple(inputs), tuple(outputs), (("callee", name),), loc)
    return _Outlined(callee, call)


def partition_function(fn: Function, predicate: NodePredicate, label: str, attrs: dict,
                       taken_names: set[str]) -> tuple[Function, list[Function]]:
    """``fn`` with every matched region replaced by a call, and the new callees."""
    import networkx as nx
    index = FunctionIndex.of(fn)
    matched = {i for i, n in enumerate(fn.nodes) if predicate(n, index)}
    if not matched:
        return fn, []
    regions = find_regions(fn, matched)
    g = data_flow_graph(fn)
    unit_of: dict[int, object] = {i: i for i in g.nodes}
    for k, r in enumerate(regions):
        unit_of.update({i: ("region", k) for i in r})
    q = _quotient(g, unit_of)
    first: dict[object, int] = {}
    for i, u in unit_of.items():
        first[u] = min(first.get(u, i), i)
    generation = {u: k for k, layer in enumerate(nx.topological_generations(q)) for u in layer}
    # callees are numbered in the order the data flows (generation, then first node)
    numbered = sorted(range(len(regions)), key=lambda k: (generation[("region", k)], regions[k][0]))
    users = fn.users()
    outlined: dict[int, _Outlined] = {}
    for number, k in enumerate(numbered):
        name = f"{fn.name}.{label}.{number}"
        while name in taken_names:
            name += "_"
        taken_names.add(name)
        outlined[k] = _outline(fn, regions[k], name, {"partition": label, **attrs}, users)
    order = nx.lexicographical_topological_sort(q, key=lambda u: first[u])
    nodes = tuple(outlined[u[1]].call if isinstance(u, tuple) else fn.nodes[u] for u in order)
    return fn.replace(nodes=nodes), [outlined[k].callee for k in numbered]


def partition_module(module: Module, predicate: NodePredicate, label: str,
                     attrs: dict | None = None) -> tuple[Module, PartitionReport]:
    """Outlines the regions ``predicate`` matches in every function (but the callees an
    earlier partition by the same ``label`` made, so a second run changes nothing)."""
    taken = {f.name for f in module.functions}
    functions: list[Function] = []
    callees: list[Function] = []
    for fn in module.functions:
        if fn.attr("partition") == label:
            functions.append(fn)
            continue
        new_fn, new_callees = partition_function(fn, predicate, label, dict(attrs or {}), taken)
        functions.append(new_fn)
        callees += new_callees
    out = module.replace(functions=tuple(functions + callees))
    return out, cut_report(out)


@register_pass
@dataclass(frozen=True)
class Partition(Pass):
    """Outlines regions matched by an op trait (``trait=attention``) or a named pattern of
    ``PARTITION_PATTERNS`` (``pattern=attention_kv``) into sub-functions; ``device`` and
    ``codegen`` become attributes of each sub-function."""

    name = "partition"
    trait: str = ""
    pattern: str = ""
    device: str = ""
    codegen: str = ""

    def apply(self, module: Module) -> Module:
        if bool(self.trait) == bool(self.pattern):
            raise PassError("partition needs exactly one of trait=... (an op trait) or pattern=... "
                            "(a name in PARTITION_PATTERNS)")
        if self.trait:
            predicate, label = trait_predicate(self.trait), self.trait
        else:
            predicate, label = get_partition_pattern(self.pattern).matches, self.pattern
        attrs = {k: v for k, v in (("device", self.device), ("codegen", self.codegen)) if v}
        return partition_module(module, predicate, label, attrs)[0]
