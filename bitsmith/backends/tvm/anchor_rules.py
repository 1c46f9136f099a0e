"""Lowering rules for ops that are kernels of their own: linear, qlinear, attention, embedding.

Each rule appends executor steps (views + one call) to the LoweringContext. Matmul weights
must be IR constants; the matmul kernels come from ``matmul.py`` (x flattened to [m, in]).
"""

from __future__ import annotations

from typing import Any, Callable

from ...ir import symbolic as sym
from ...ir.graph import Node
from .attention import attention_kernel, embedding_kernel

AnchorRule = Callable[[Node, "LoweringContext"], None]  # noqa: F821
ANCHOR_RULES: dict[str, AnchorRule] = {}


def register_anchor(*ops: str) -> Callable[[AnchorRule], AnchorRule]:
    def deco(fn: AnchorRule) -> AnchorRule:
        for op in ops:
            if op in ANCHOR_RULES:
                raise ValueError(f"tvm anchor rule for {op!r} registered twice")
            ANCHOR_RULES[op] = fn
        return fn
    return deco


def flatten_in(node: Node, ctx) -> tuple[int, list]:
    """Views x [..., in] as [m, in]; returns (slot, leading dims)."""
    x = ctx.types[node.inputs[0]]
    lead = list(x.shape[:-1])
    m = sym.product(tuple(lead)) if lead else 1
    return ctx.view(ctx.slot(node.inputs[0]), [m, x.shape[-1]]), lead


def finish_out(node: Node, ctx, y2: int) -> None:
    ctx.view(y2, node.output.type.shape, ctx.slot(node.output.name))


def matmul_out(node: Node, ctx, lead: list) -> int:
    t = node.output.type
    m = sym.product(tuple(lead)) if lead else 1
    return ctx.out(ctx.new_slot(), [m, t.shape[-1]], t.dtype)


def attrs_reason(node: Node) -> str | None:
    """Why the anchor rules refuse ``node``'s attributes (None: they take them)."""
    if node.op == "linear" and (node.attr("sparsity") or node.attr("outliers")):
        return "linear with sparsity/outlier annotations (quantize it to qlinear)"
    if node.op == "qembedding":
        from ...ir.quant_grids import get_scheme
        from .qlinear_layout import gather_native
        if not gather_native(get_scheme(str(node.attr("scheme")))):
            return f"qembedding of scheme {node.attr('scheme')}: no gather kernel (the dequantize pass decodes it)"
    return None


@register_anchor("linear")
def _linear(node: Node, ctx) -> None:
    from . import matmul
    reason = attrs_reason(node)
    if reason:
        raise ctx.unsupported(node, reason)
    consts = [ctx.constant_of(v) for v in node.inputs[1:]]
    if any(c is None for c in consts):
        raise ctx.unsupported(node, "weight and bias must be constants")
    w = consts[0]
    x_dtype = ctx.types[node.inputs[0]].dtype
    kdef = matmul.linear_kernel(w.shape[1], w.shape[0], len(consts) == 2, x_dtype, ctx.types[node.inputs[1]].dtype)
    x2, lead = flatten_in(node, ctx)
    out = matmul_out(node, ctx, lead)
    ctx.call(kdef, [x2] + [ctx.slot(v) for v in node.inputs[1:]], [out])
    finish_out(node, ctx, out[0])


@register_anchor("qlinear")
def _qlinear(node: Node, ctx, activation_bits: int = 32) -> None:
    from . import matmul
    arrays = [ctx.constant_of(v) for v in node.inputs[1:]]
    if any(a is None for a in arrays):
        raise ctx.unsupported(node, "quantized operands must be constants")
    x_dtype = ctx.types[node.inputs[0]].dtype
    attrs = node.attr_dict
    operands = matmul.qlinear_operands(attrs, arrays, x_dtype)
    kdef = matmul.qlinear_kernel(attrs, operands, x_dtype, activation_bits)
    slots = [ctx.derived_const(node.output.name, k, a) for k, a in enumerate(operands)]
    x2, lead = flatten_in(node, ctx)
    out = matmul_out(node, ctx, lead)
    ctx.call(kdef, [x2] + slots, [out])
    finish_out(node, ctx, out[0])


def qlinear_a8(node: Node, ctx) -> None:
    """The qlinear rule of tvm-llvm's ``activation_bits=8`` (int8 activations where the W4A8
    kernel covers the layer, ``qlinear_a8.applies``; float kernels elsewhere)."""
    _qlinear(node, ctx, activation_bits=8)


def attention_args(node: Node, ctx) -> tuple:
    """``make_kernel``'s arguments for an attention node: (heads, kv_heads, head_dim, value_dim,
    scale, causal, dtype, mask_dtype); UnsupportedOpError where the kernels cannot take it."""
    q, k, v = (ctx.types[i] for i in node.inputs[:3])
    mask_dtype = ctx.types[node.inputs[3]].dtype if len(node.inputs) == 4 else None
    if not all(isinstance(d, int) for d in (q.shape[1], q.shape[3], k.shape[1], v.shape[3])):
        raise ctx.unsupported(node, "head counts and head dims must be static")
    if q.shape[1] % k.shape[1]:
        raise ctx.unsupported(node, f"{q.shape[1]} query heads do not group over {k.shape[1]} kv heads")
    return (q.shape[1], k.shape[1], q.shape[3], v.shape[3], float(node.attr("scale")),
            bool(node.attr("causal")), q.dtype, mask_dtype)


def _attention_with(make_kernel: Callable[..., Any]) -> AnchorRule:
    """An attention rule calling ``make_kernel(*attention_args(node))`` (one kernel: q, k, v[, mask] -> out)."""

    def rule(node: Node, ctx) -> None:
        kdef = make_kernel(*attention_args(node, ctx))
        t = node.output.type
        ctx.call(kdef, [ctx.slot(i) for i in node.inputs], [ctx.out(ctx.slot(node.output.name), t.shape, t.dtype)])

    return rule


register_anchor("attention")(_attention_with(attention_kernel))


def cuda_anchor_rules() -> dict[str, AnchorRule]:
    """tvm-cuda's overrides: attention as split-KV decode + tiled prefill (``attention_cuda``)."""
    from .attention_cuda import flash_attention_kernel
    return {"attention": _attention_with(flash_attention_kernel)}


@register_anchor("embedding")
def _embedding(node: Node, ctx) -> None:
    table, ids = (ctx.types[i] for i in node.inputs)
    if not all(isinstance(d, int) for d in table.shape):
        raise ctx.unsupported(node, "the table shape must be static")
    kdef = embedding_kernel(table.shape[0], table.shape[1], ids.dtype, table.dtype)
    n = sym.product(tuple(ids.shape)) if ids.shape else 1
    flat_ids = ctx.view(ctx.slot(node.inputs[1]), [n])
    t = node.output.type
    out = ctx.out(ctx.new_slot(), [n, table.shape[1]], t.dtype)
    ctx.call(kdef, [ctx.slot(node.inputs[0]), flat_ids], [out], check_ids=(flat_ids, table.shape[0]))
    finish_out(node, ctx, out[0])


@register_anchor("qembedding")
def _qembedding(node: Node, ctx) -> None:
    from .packed_gather import qembedding_kernel
    attrs = dict(node.attr_dict)
    ids = ctx.types[node.inputs[-1]]
    try:
        kdef = qembedding_kernel(attrs, ids.dtype)
    except ValueError as e:
        raise ctx.unsupported(node, str(e)) from None
    n = sym.product(tuple(ids.shape)) if ids.shape else 1
    flat_ids = ctx.view(ctx.slot(node.inputs[-1]), [n])
    out = ctx.out(ctx.new_slot(), [n, attrs["in_features"]], node.output.type.dtype)
    packed = [ctx.slot(v) for v in node.inputs[:-1]]
    ctx.call(kdef, packed + [flat_ids], [out], check_ids=(flat_ids, attrs["out_features"]))
    finish_out(node, ctx, out[0])


from . import bcq as _bcq  # noqa: E402,F401  registers the bcq_linear anchor from its own module
