"""What crosses the boundary of each call: values, types and bytes per call for given dims.

Computed from a module alone (after ``partition``, after a whole pipeline, from a loaded
artifact): every ``call`` node is one row. A value ``boundary`` enters through the caller's
own parameters (an input of the whole function, such as a KV cache) or leaves only as a
caller result (or is read by nothing); the rest are exchanged between the callee and the
caller's other nodes, which is what a split across two devices pays for on every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # imported where used: networkx costs ~0.3 s and only cut reports need it
    import networkx as nx

from bitsmith.ir import Function, Location, Module, TensorType
from bitsmith.ir import symbolic as sym
from bitsmith.ir.types import numpy_dtype


def value_bytes(t: TensorType) -> sym.Dim:
    """Bytes of a tensor of type ``t``, symbolic when its shape is (``"768*batch*seq"``)."""
    return sym.mul(sym.product(t.shape), numpy_dtype(t.dtype).itemsize)


def total_bytes(types: tuple[TensorType, ...]) -> sym.Dim:
    out: sym.Dim = 0
    for t in types:
        out = sym.add(out, value_bytes(t))
    return out


@dataclass(frozen=True)
class CutValue:
    name: str  # in the caller
    type: TensorType
    boundary: bool

    def nbytes(self, bindings: Mapping[str, int]) -> int:
        return sym.evaluate(value_bytes(self.type), bindings)


@dataclass(frozen=True)
class CallCut:
    caller: str
    callee: str
    loc: Location | None
    generation: int  # topological generation of the call in the caller's data flow
    inputs: tuple[CutValue, ...]
    outputs: tuple[CutValue, ...]

    def bytes_in(self, bindings: Mapping[str, int], exchanged_only: bool = False) -> int:
        return sum(v.nbytes(bindings) for v in self.inputs if not (exchanged_only and v.boundary))

    def bytes_out(self, bindings: Mapping[str, int], exchanged_only: bool = False) -> int:
        return sum(v.nbytes(bindings) for v in self.outputs if not (exchanged_only and v.boundary))

    def nbytes(self, bindings: Mapping[str, int], exchanged_only: bool = False) -> int:
        return self.bytes_in(bindings, exchanged_only) + self.bytes_out(bindings, exchanged_only)


@dataclass(frozen=True)
class PartitionReport:
    """One ``CallCut`` per call node of the module, in function then node order."""

    calls: tuple[CallCut, ...]

    def nbytes(self, bindings: Mapping[str, int], exchanged_only: bool = False) -> int:
        """Bytes crossing every call boundary once, for the given dim values."""
        return sum(c.nbytes(bindings, exchanged_only) for c in self.calls)

    def callees(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.callee for c in self.calls))

    def table(self, bindings: Mapping[str, int]) -> str:
        """A text table: one row per call, bytes in/out (all, and exchanged only)."""
        rows = ["| call | where | generation | in bytes | out bytes | exchanged in | exchanged out |",
                "|---|---|---|---|---|---|---|"]
        for c in self.calls:
            rows.append(f"| {c.caller} -> {c.callee} | {c.loc.module_path if c.loc else ''} | {c.generation} "
                        f"| {c.bytes_in(bindings)} | {c.bytes_out(bindings)} "
                        f"| {c.bytes_in(bindings, True)} | {c.bytes_out(bindings, True)} |")
        rows.append(f"| total ({len(self.calls)} calls) | | | {sum(c.bytes_in(bindings) for c in self.calls)} "
                    f"| {sum(c.bytes_out(bindings) for c in self.calls)} "
                    f"| {sum(c.bytes_in(bindings, True) for c in self.calls)} "
                    f"| {sum(c.bytes_out(bindings, True) for c in self.calls)} |")
        return "\n".join(rows)


def data_flow_graph(fn: Function) -> nx.DiGraph:
    """Nodes are node indices; an edge ``i -> j`` when node j reads a value node i defines."""
    import networkx as nx
    g = nx.DiGraph()
    g.add_nodes_from(range(len(fn.nodes)))
    producer = {o.name: i for i, n in enumerate(fn.nodes) for o in n.outputs}
    for j, n in enumerate(fn.nodes):
        g.add_edges_from((producer[v], j) for v in n.inputs if v in producer)
    return g


def _function_cuts(fn: Function) -> list[CallCut]:
    calls = [i for i, n in enumerate(fn.nodes) if n.op == "call"]
    if not calls:
        return []
    import networkx as nx
    generation = {i: k for k, layer in enumerate(nx.topological_generations(data_flow_graph(fn))) for i in layer}
    types = fn.value_types()
    params = {p.name for p in fn.params}
    users = fn.users()
    out = []
    for i in calls:
        node = fn.nodes[i]
        ins = tuple(CutValue(v, types[v], v in params) for v in dict.fromkeys(node.inputs))
        outs = tuple(CutValue(o.name, o.type, not users.get(o.name)) for o in node.outputs)
        out.append(CallCut(fn.name, node.attr("callee"), node.loc, generation[i], ins, outs))
    return out


def cut_report(module: Module) -> PartitionReport:
    """The report of every call in ``module``."""
    return PartitionReport(tuple(c for fn in module.functions for c in _function_cuts(fn)))
