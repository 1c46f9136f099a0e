"""FLOPs and bytes of each IR op from its shapes, as symbolic dims (GenZ / LLM-Viewer style).

A cost rule is registered per op trait (``register_cost_rule``), or per op name where one op
of a trait moves data differently (``register_op_cost_rule``: a KV-cache ``concat``). Rules
see the node and the types of its operands and results, and return (FLOPs, bytes) as
polynomials over the function's dims (``batch``, ``seq``, ``past``), so one walk of the IR
serves every batch size and context length. Bytes count every operand read and result
written once, each op on its own (no fusion across ops): the per-op roofline
``max(flops / peak, bytes / bandwidth)`` of LLM-Viewer (Yuan et al., arXiv 2402.16363).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..ir import Function, Node, TensorType
from ..ir import symbolic as sym
from ..ir.traits import (ATTENTION, CALL, CONTRACTION, ELEMENTWISE, GATHER, NORMALIZATION, REDUCTION,
                         SHAPE_ONLY, SOURCE, has_trait)
from ..ir.types import FLOAT_DTYPES, numpy_dtype

Dim = sym.Dim


@dataclass(frozen=True)
class ElementSizes:
    """Bytes per element: as the IR types say, or every float tensor at ``float_bytes``
    (2 to plan an fp16 deployment of a float32 capture). Integer tensors keep their size."""

    float_bytes: int | None = None

    def of(self, t: TensorType) -> int:
        if self.float_bytes is not None and (t.dtype in FLOAT_DTYPES or t.dtype == "bfloat16"):
            return self.float_bytes
        return numpy_dtype(t.dtype).itemsize

    def nbytes(self, t: TensorType) -> Dim:
        return sym.mul(sym.product(t.shape), self.of(t))


AS_IR = ElementSizes()
FP16 = ElementSizes(2)


@dataclass(frozen=True)
class OpCost:
    op: str
    rule: str  # the trait or op name whose rule costed it
    flops: Dim
    bytes: Dim


CostRule = Callable[[Node, tuple[TensorType, ...], tuple[TensorType, ...], ElementSizes], tuple[Dim, Dim]]

_TRAIT_RULES: list[tuple[str, CostRule]] = []  # in priority order: the first trait an op has wins
_OP_RULES: dict[str, CostRule] = {}
GENERIC_RULE = "generic"


def register_cost_rule(trait: str) -> Callable[[CostRule], CostRule]:
    """Decorator: the rule for ops declaring ``trait`` (rules registered earlier win)."""
    def deco(rule: CostRule) -> CostRule:
        _TRAIT_RULES.append((trait, rule))
        return rule
    return deco


def register_op_cost_rule(op: str) -> Callable[[CostRule], CostRule]:
    """Decorator: the rule for one op name, ahead of any trait rule."""
    def deco(rule: CostRule) -> CostRule:
        _OP_RULES[op] = rule
        return rule
    return deco


def _sum(dims) -> Dim:
    out: Dim = 0
    for d in dims:
        out = sym.add(out, d)
    return out


def _io_bytes(ins: tuple[TensorType, ...], outs: tuple[TensorType, ...], sizes: ElementSizes) -> Dim:
    return _sum(sizes.nbytes(t) for t in ins + outs)


def _numel(t: TensorType) -> Dim:
    return sym.product(t.shape)


@register_cost_rule(CALL)
def _call(node, ins, outs, sizes):
    return 0, 0  # the callee's own ops are costed where the callee runs


@register_cost_rule(SOURCE)
def _source(node, ins, outs, sizes):
    return 0, 0  # a constant is read by the op that uses it, and counted there


@register_cost_rule(ATTENTION)
def _attention(node, ins, outs, sizes):
    """q [b,hq,s,d], k/v [b,hkv,t,d|dv]: q k^T and p v are 2*b*hq*s*t*d and 2*b*hq*s*t*dv
    multiply-adds; the softmax ~5 ops per score (scale, max, exp, sum, divide). Bytes: q, k,
    v read once (grouped-query heads share their k/v reads), the output written once."""
    q, k, v = ins
    b, hq, s, d = q.shape
    t, dv = k.shape[2], v.shape[3]
    scores = sym.product((b, hq, s, t))
    flops = sym.add(sym.mul(scores, sym.mul(2, sym.add(d, dv))), sym.mul(scores, 5))
    return flops, _io_bytes(ins, outs, sizes)


@register_cost_rule(CONTRACTION)
def _contraction(node, ins, outs, sizes):
    """linear / qlinear / matmul: 2*K FLOPs per output element, K the first operand's last dim."""
    k = ins[0].shape[-1]
    flops = sym.mul(sym.mul(_numel(outs[0]), k), 2)
    if len(ins) > 2 and node.op == "linear":  # bias: one add per output element
        flops = sym.add(flops, _numel(outs[0]))
    return flops, _io_bytes(ins, outs, sizes)


@register_cost_rule(GATHER)
def _gather(node, ins, outs, sizes):
    """embedding: reads the ids and one table row per output row; writes the output."""
    table, ids = ins
    return 0, _sum((sizes.nbytes(ids), sizes.nbytes(outs[0]), sizes.nbytes(outs[0])))


@register_op_cost_rule("qembedding")
def _packed_gather(node, ins, outs, sizes):
    """qembedding: reads the ids and one row of each packed operand per id (codes, scales, ...);
    one decode op per output element; writes the output."""
    *packed, ids = ins
    rows = _numel(ids)
    row_bytes = _sum(sym.mul(rows, sizes.nbytes(TensorType(t.shape[1:], t.dtype))) for t in packed)
    return _numel(outs[0]), _sum((sizes.nbytes(ids), row_bytes, sizes.nbytes(outs[0])))


@register_cost_rule(NORMALIZATION)
def _normalization(node, ins, outs, sizes):
    """softmax / layer_norm: ~5 ops per input element (max or mean, subtract, exp or square,
    sum, divide); operands read and results written once."""
    return sym.mul(_numel(ins[0]), 5), _io_bytes(ins, outs, sizes)


@register_cost_rule(REDUCTION)
def _reduction(node, ins, outs, sizes):
    return _numel(ins[0]), _io_bytes(ins, outs, sizes)


@register_op_cost_rule("concat")
def _concat(node, ins, outs, sizes):
    """Appending to a buffer in place: only the elements beyond the largest operand are
    written (a KV-cache append writes the new rows, not the whole cache again)."""
    largest = max((sizes.nbytes(t) for t in ins), key=lambda d: sym.evaluate(d, _PROBE))
    return 0, sym.sub(sizes.nbytes(outs[0]), largest)


@register_cost_rule(SHAPE_ONLY)
def _shape_only(node, ins, outs, sizes):
    return 0, 0  # reshape / permute / slice / expand: views folded into their consumer


@register_cost_rule(ELEMENTWISE)
def _elementwise(node, ins, outs, sizes):
    """One op per output element; every operand read and the result written once."""
    return _numel(outs[0]), _io_bytes(ins, outs, sizes)


# dims to compare symbolic sizes by (which concat operand is the buffer): a large context
_PROBE: Mapping[str, int] = {"batch": 1, "seq": 1, "past": 1 << 20}


def _generic(node, ins, outs, sizes):
    return _numel(outs[0]) if outs else 0, _io_bytes(ins, outs, sizes)


def op_cost(node: Node, types: Mapping[str, TensorType], sizes: ElementSizes = AS_IR) -> OpCost:
    """The cost of ``node``; an op no rule covers gets one op per output element and its
    operand/result bytes, marked ``rule="generic"`` so reports can name it."""
    ins = tuple(types[i] for i in node.inputs)
    outs = tuple(o.type for o in node.outputs)
    if node.op in _OP_RULES:
        return OpCost(node.op, node.op, *_OP_RULES[node.op](node, ins, outs, sizes))
    for trait, rule in _TRAIT_RULES:
        if has_trait(node.op, trait):
            return OpCost(node.op, trait, *rule(node, ins, outs, sizes))
    return OpCost(node.op, GENERIC_RULE, *_generic(node, ins, outs, sizes))


def function_costs(fn: Function, sizes: ElementSizes = AS_IR) -> tuple[OpCost, ...]:
    types = fn.value_types()
    return tuple(op_cost(n, types, sizes) for n in fn.nodes)
