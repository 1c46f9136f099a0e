"""A partitioned decode module reduced to what the cost model needs: per-side op costs,
bytes exchanged per layer call, weights and KV-cache bytes, all symbolic in batch/past.

The dense side is every function that is not a partition callee (the caller's own nodes);
the attention side is the callees (``partition{pattern=attention_kv}`` outlines attention
and its KV-cache appends). Costs of identical ops (the same per-layer op in every layer)
are grouped, so evaluating a profile at one (batch, context) point is cheap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from ..errors import BitsmithError
from ..ir import Module, TensorType
from ..ir import symbolic as sym
from ..passes.cut_report import cut_report
from .roofline import AS_IR, GENERIC_RULE, ElementSizes, OpCost, function_costs

Dim = sym.Dim
CACHE_DIM = "past"  # the KV-cache length symbol of the kv-cache pass


class ProfileError(BitsmithError):
    """A module the offload cost model cannot read (no attention partition, no KV cache)."""


def decode_bindings(batch: int, context: int) -> dict[str, int]:
    """One decode step: one new token per sequence over ``context`` cached ones."""
    return {"batch": batch, "seq": 1, CACHE_DIM: context}


@dataclass(frozen=True)
class SideProfile:
    """The ops of one side, grouped: ((flops, bytes), count) plus the op names per group."""

    groups: tuple[tuple[Dim, Dim, int], ...]
    generic_ops: tuple[str, ...]  # ops no specific cost rule covered

    @classmethod
    def of(cls, costs: list[OpCost]) -> "SideProfile":
        counted = Counter((c.flops, c.bytes) for c in costs if c.flops != 0 or c.bytes != 0)
        generic = tuple(sorted({c.op for c in costs if c.rule == GENERIC_RULE}))
        return cls(tuple((f, b, n) for (f, b), n in counted.items()), generic)

    def totals(self, bindings: Mapping[str, int]) -> tuple[int, int]:
        """(FLOPs, bytes) of one evaluation of this side."""
        flops = sum(n * sym.evaluate(f, bindings) for f, _, n in self.groups)
        nbytes = sum(n * sym.evaluate(b, bindings) for _, b, n in self.groups)
        return flops, nbytes

    @property
    def ops(self) -> int:
        """Ops that move or compute anything (views and constants excluded)."""
        return sum(n for _, _, n in self.groups)

    def seconds(self, bindings: Mapping[str, int], peak_flops: float, bandwidth: float,
                op_overhead: float = 0.0) -> float:
        """Sum over ops of max(flops / peak, bytes / bandwidth): each op at its own roofline,
        plus ``op_overhead`` seconds per op (a kernel launch, an interpreter's dispatch)."""
        return sum(n * (op_overhead + max(sym.evaluate(f, bindings) / peak_flops,
                                          sym.evaluate(b, bindings) / bandwidth))
                   for f, b, n in self.groups)


@dataclass(frozen=True)
class DecodeProfile:
    """Everything the planner reads from a partitioned decode module."""

    name: str
    dense: SideProfile
    attention: SideProfile
    layers: int  # attention calls per decode step (one per layer)
    kv_heads: int  # the most KV heads of any layer: attention splits by heads up to this
    to_attention: Dim  # bytes sent per step (all layers), symbolic
    from_attention: Dim  # bytes received per step (all layers), symbolic
    dense_weight_bytes: int  # constants the dense side reads (weights)
    attention_weight_bytes: int
    kv_cache: Dim  # bytes of the whole KV cache, symbolic in batch and past

    def transfer_bytes(self, bindings: Mapping[str, int]) -> tuple[int, int]:
        return sym.evaluate(self.to_attention, bindings), sym.evaluate(self.from_attention, bindings)

    def kv_bytes_per_sequence(self, context: int) -> int:
        return sym.evaluate(self.kv_cache, {"batch": 1, "seq": 1, CACHE_DIM: context})


def _constant_bytes(module: Module, function_names: set[str], sizes: ElementSizes) -> int:
    """Bytes of the distinct tensors the named functions read (a tied weight counts once)."""
    names = {n.attr("name") for f in module.functions if f.name in function_names for n in f.nodes
             if n.op == "constant"}
    return sum(sym.evaluate(sizes.nbytes(_info_type(module, name)), {}) for name in names)


def _info_type(module: Module, name: str) -> TensorType:
    info = module.tensors.info(name)
    return TensorType(tuple(info.shape), info.dtype)


def attention_functions(module: Module) -> set[str]:
    """The attention side: functions whose ``device`` attribute is ``attention`` (the
    ``offload_attention`` pass marks both sides), else every partition callee."""
    marked = {f.name for f in module.functions if f.attr("device") == "attention"}
    return marked or {f.name for f in module.functions if f.attr("partition") is not None}


def decode_profile(module: Module, sizes: ElementSizes = AS_IR, name: str = "") -> DecodeProfile:
    """The profile of ``module``, a decode function with its attention outlined into callees."""
    callees = attention_functions(module)
    if not callees:
        raise ProfileError(f"module {name} has no partitioned attention functions: run "
                           f"partition{{pattern=attention_kv}} (or offload_attention) first")
    cuts = [c for c in cut_report(module).calls if c.callee in callees]
    dense_fns = {f.name for f in module.functions} - callees
    dense = [c for f in module.functions if f.name in dense_fns for c in function_costs(f, sizes)]
    attention = [c for f in module.functions if f.name in callees for c in function_costs(f, sizes)]
    to_att: Dim = 0
    from_att: Dim = 0
    for call in cuts:  # what crosses between the sides; the cache (a caller parameter) stays
        for v in call.inputs:
            if not v.boundary:
                to_att = sym.add(to_att, sizes.nbytes(v.type))
        for v in call.outputs:
            if not v.boundary:
                from_att = sym.add(from_att, sizes.nbytes(v.type))
    callers = {c.caller for c in cuts}
    kv: Dim = 0
    for f in module.functions:
        if f.name in callers:
            for p in f.params:
                if CACHE_DIM in set().union(*(sym.symbols(d) for d in p.type.shape)):
                    kv = sym.add(kv, sizes.nbytes(p.type))
    if kv == 0:
        raise ProfileError(f"module {name} has no KV-cache parameters (dims over {CACHE_DIM!r}): "
                           f"it needs the kv-cache pass")
    heads = [t.shape[1] for f in module.functions if f.name in callees for n in f.nodes
             if n.op == "attention" for t in (f.value_types()[n.inputs[1]],)]
    kv_heads = max((h for h in heads if isinstance(h, int)), default=1)
    return DecodeProfile(name or str(module.attr("model_name") or ""), SideProfile.of(dense),
                         SideProfile.of(attention), len(cuts), kv_heads, to_att, from_att,
                         _constant_bytes(module, dense_fns, sizes), _constant_bytes(module, callees, sizes), kv)
