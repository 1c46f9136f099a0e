"""Pass ``offload_attention``: split a cached decode function into a dense and an attention program.

Lamina (Chen et al., "Efficient and Economic Large Language Model Inference with Attention
Offloading", arXiv 2405.01814) keeps the KV cache and the attention over it on memory-optimized
devices and runs everything else on compute devices; per layer and token, the dense side sends
q/k/v and receives the attention output. Here, on the function made by ``kv-cache``:

1. ``partition{pattern=attention_kv}`` outlines each attention with its cache appends into
   ``<fn>.attention.<i>`` (device ``attention``): the KV cache state (the function's ``past_*``
   parameters and ``present_*`` results) enters and leaves only through these functions.
2. The remaining nodes are cut into segments ``<fn>.dense.<j>`` (device ``dense``): segment j
   holds what runs between attention i = j - 1 and attention j, each node placed as late as its
   users allow (so a layer's q/k/v projections sit right before its attention); constants and
   literals are repeated in every segment that reads them rather than carried across.
3. ``<fn>`` becomes the schedule: only calls, dense and attention alternating. Every value one
   device makes and the other reads is a transfer point; the cache stays on the attention side.

Each attention function records, from shapes: ``send_bytes`` (dense -> attention: the new q, k,
v and any other operand; the cache is not sent) and ``recv_bytes`` (attention -> dense: the
output), as ints or symbolic expressions over ``batch``/``seq``; ``param_roles`` (``state``: a
cache parameter; ``q``/``kv``: split by heads; ``other``: replicated, e.g. a mask) and
``result_state`` (for each result, the cache parameter it replaces, or -1). ``offload_report``
gives per-layer and total bytes for given dims. ``inline`` restores the original function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from bitsmith.errors import PassError
from bitsmith.ir import Function, Module, Node, Value
from bitsmith.ir import symbolic as sym
from bitsmith.ir.traits import ATTENTION, SOURCE, has_trait

from .base import Pass, register_pass
from .cut_report import total_bytes
from .partition import partition_function
from .partition_patterns import get_partition_pattern

LABEL = "offload_attention"
DENSE, ATTENTION_DEVICE = "dense", "attention"
Q_OPERAND, KV_OPERANDS = 0, (1, 2)  # the attention op's operands split by heads: q, then k and v


def _operand_sources(value: str, producers: Mapping[str, Node], params: set[str]) -> set[str]:
    """Parameters ``value`` comes from through cache appends (``concat`` along the sequence)."""
    if value in params:
        return {value}
    node = producers.get(value)
    if node is None or node.op != "concat":
        return set()
    return set().union(*(_operand_sources(v, producers, params) for v in node.inputs))


def attention_roles(fn: Function, state: set[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(role of each parameter, for each result the index of the cache parameter it replaces or -1).

    Roles: ``state`` for the cache; ``q`` / ``kv`` for what reaches the attention op's query or
    key/value operand (split by heads across attention workers); ``other`` for the rest (a mask,
    replicated to every worker)."""
    producers = fn.producers()
    params = {p.name for p in fn.params}
    role = {p.name: "other" for p in fn.params}
    for node in fn.nodes:
        if not has_trait(node.op, ATTENTION):
            continue
        for k, v in enumerate(node.inputs):
            kind = "q" if k == Q_OPERAND else "kv" if k in KV_OPERANDS else None
            for p in _operand_sources(v, producers, params) if kind else ():
                role[p] = "state" if p in state else kind
    index = {p.name: i for i, p in enumerate(fn.params)}
    result_state = []
    for r in fn.results:
        node = producers.get(r)
        cached = [v for v in (node.inputs if node is not None and node.op == "concat" else ()) if role.get(v) == "state"]
        result_state.append(index[cached[0]] if cached else -1)
    return tuple(role[p.name] for p in fn.params), tuple(result_state)


def _segments(fn: Function, calls: list[int]) -> dict[int, int]:
    """Segment of every non-call, non-source node: as late as its readers allow (node index ->
    segment; segment j runs before attention call j, segment len(calls) after the last)."""
    last = len(calls)
    call_number = {i: k for k, i in enumerate(calls)}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            readers.setdefault(v, []).append(i)
    seg: dict[int, int] = {}
    for i in range(len(fn.nodes) - 1, -1, -1):
        node = fn.nodes[i]
        if i in call_number or has_trait(node.op, SOURCE):
            continue
        readers_of = [r for o in node.outputs for r in readers.get(o.name, ())]
        seg[i] = min([call_number[r] if r in call_number else seg[r] for r in readers_of], default=last)
    return seg


def _function_of(name: str, nodes: list[Node], fn: Function, outside_readers: set[str], attrs: dict) -> Function:
    types = fn.value_types()
    defined = {o.name for n in nodes for o in n.outputs}
    inputs = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in defined))
    results = [o.name for n in nodes for o in n.outputs if o.name in outside_readers]
    return Function(name, tuple(Value(v, types[v]) for v in inputs), tuple(nodes), tuple(results), attrs)


def _call(callee: Function, fn: Function) -> Node:
    types = fn.value_types()
    located = [n.loc for n in callee.nodes if n.loc is not None and n.loc.module_path]
    computed = [n.loc for n in callee.nodes if n.loc is not None and n.loc.module_path and not has_trait(n.op, SOURCE)]
    loc = (computed or located or [None])[0]  # where the segment's first computation comes from
    return Node("call", tuple(p.name for p in callee.params), tuple(Value(r, types[r]) for r in callee.results),
                (("callee", callee.name),), loc)


def offload_function(fn: Function, taken: set[str]) -> list[Function]:
    """[schedule, dense and attention functions] for ``fn``; PassError if it has no KV cache."""
    pattern = get_partition_pattern("attention_kv")
    parted, attention = partition_function(fn, pattern.matches, ATTENTION_DEVICE, {}, taken)
    if not attention:
        raise PassError(f"offload_attention: function {fn.name} has no attention op to offload")
    params = {p.name for p in fn.params}
    state = {v for f in attention for v in (p.name for p in f.params) if v in params}
    if not state:
        raise PassError(f"offload_attention: no attention of {fn.name} reads a KV cache parameter; run "
                        "kv-cache first (the cache must live on the attention side)")
    users = parted.users()
    for v in state:
        if any(u.op != "call" for u in users.get(v, ())):
            raise PassError(f"offload_attention: cache parameter %{v} of {fn.name} is read outside attention; "
                            "the cache cannot live only on the attention side")
    calls = [i for i, n in enumerate(parted.nodes) if n.op == "call"]
    by_name = {f.name: f for f in attention}
    seg = _segments(parted, calls)
    chunks: list[list[Node]] = [[] for _ in range(len(calls) + 1)]
    for i, s in seg.items():
        chunks[s].append(parted.nodes[i])
    sources = {o.name: n for n in parted.nodes if has_trait(n.op, SOURCE) for o in n.outputs}
    passed: list[set[str]] = [set() for _ in chunks]  # literals a segment hands to a call (or returns)
    for k, i in enumerate(calls):  # a literal an attention reads directly is made just before it
        passed[k] |= {v for v in parted.nodes[i].inputs if v in sources}
    passed[-1] |= {v for v in parted.results if v in sources}
    for chunk, names in zip(chunks, passed):
        chunk += [sources[v] for v in names]
    for chunk in chunks:  # every segment makes its own copy of the literals it reads
        read = {v for n in chunk for v in n.inputs}
        have = {id(n) for n in chunk}
        chunk[:0] = [n for v, n in sources.items() if v in read and id(n) not in have]
    order = {id(n): i for i, n in enumerate(parted.nodes)}
    segment_of = {o.name: s for s, chunk in enumerate(chunks) for n in chunk for o in n.outputs
                  if o.name not in sources}
    call_inputs = {v for i in calls for v in parted.nodes[i].inputs}
    outside = (call_inputs | set(parted.results)) - set(sources)  # what a segment returns: read by a call or another segment
    outside |= {v for s, chunk in enumerate(chunks) for n in chunk for v in n.inputs
                if v in segment_of and segment_of[v] != s}
    schedule: list[Node] = []
    functions: list[Function] = []
    for s, chunk in enumerate(chunks):
        chunk.sort(key=lambda n: order[id(n)])
        if chunk:
            name = f"{fn.name}.dense.{s}"
            while name in taken:
                name += "_"
            taken.add(name)
            dense = _function_of(name, chunk, parted, outside | passed[s], {"device": DENSE, "partition": LABEL})
            functions.append(dense)
            schedule.append(_call(dense, parted))
        if s < len(calls):
            call = parted.nodes[calls[s]]
            callee = by_name[call.attr("callee")]
            roles, result_state = attention_roles(callee, state)
            sent = tuple(p.type for p, r in zip(callee.params, roles) if r != "state")
            received = tuple(callee.value_types()[r] for r, st in zip(callee.results, result_state) if st < 0)
            attrs = {"device": ATTENTION_DEVICE, "partition": LABEL, "layer": s, "param_roles": roles,
                     "result_state": result_state, "send_bytes": total_bytes(sent), "recv_bytes": total_bytes(received)}
            functions.append(callee.replace(attrs=attrs))
            schedule.append(call)
    return [parted.replace(nodes=tuple(schedule), attrs={**dict(fn.attrs), "partition": LABEL})] + functions


def is_offloaded(fn: Function) -> bool:
    return fn.attr("partition") == LABEL


@dataclass(frozen=True)
class LayerBytes:
    callee: str
    layer: int
    sent: int
    received: int


@dataclass(frozen=True)
class OffloadReport:
    """Bytes crossing the dense/attention cut, per attention call, for given dims."""

    layers: tuple[LayerBytes, ...]

    @property
    def sent(self) -> int:
        return sum(layer.sent for layer in self.layers)

    @property
    def received(self) -> int:
        return sum(layer.received for layer in self.layers)

    def table(self) -> str:
        rows = ["| layer | attention function | sent (dense -> attention) | received | total |", "|---|---|---|---|---|"]
        rows += [f"| {x.layer} | {x.callee} | {x.sent} | {x.received} | {x.sent + x.received} |" for x in self.layers]
        rows.append(f"| all ({len(self.layers)}) | | {self.sent} | {self.received} | {self.sent + self.received} |")
        return "\n".join(rows)


def offload_report(module: Module, bindings: Mapping[str, int]) -> OffloadReport:
    """Per-layer bytes sent/received for ``bindings`` (a decode token: ``{"batch": b, "seq": 1}``)."""
    layers = [LayerBytes(f.name, int(f.attr("layer")), sym.evaluate(f.attr("send_bytes"), bindings),
                         sym.evaluate(f.attr("recv_bytes"), bindings))
              for f in module.functions if f.attr("partition") == LABEL and f.attr("device") == ATTENTION_DEVICE]
    if not layers:
        raise PassError("the module has no offloaded attention (run offload_attention first)")
    return OffloadReport(tuple(sorted(layers, key=lambda x: x.layer)))


@register_pass
@dataclass(frozen=True)
class OffloadAttention(Pass):
    """Splits ``function`` (a cached decode function) into a schedule of calls to dense segments
    and attention functions that own the KV cache (see the module docstring)."""

    name = "offload_attention"
    # a second run changes nothing (tests/test_pass_offload_attention.py); not declared
    # ``idempotent`` because the generic check feeds random modules, which have no KV cache
    function: str = "main"

    def apply(self, module: Module) -> Module:
        fn = module.function(self.function)
        if is_offloaded(fn):
            return module
        taken = {f.name for f in module.functions}
        new = offload_function(fn, taken)
        functions = [f for f in module.functions if f.name != fn.name]
        index = next(i for i, f in enumerate(module.functions) if f.name == fn.name)
        return module.replace(functions=tuple(functions[:index] + new + functions[index:]))
