"""Lowering rules for the ops that fuse: elementwise, reductions, norms, data movement.

Each rule maps a node and its inputs (``Lazy`` values) to the ``Lazy`` of its output; the
fusion layer (``fusion.py``) chains them into one kernel. Rules are dtype-parametric:
half-precision inputs reduce in float32. Semantics follow ``bitsmith/ir/interpreter.py``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from tvm import te, tirx

from ...ir import symbolic as sym
from ...ir.graph import Node
from .lazy import Lazy, literal, materialize
from .symbols import DimEnv

FusedRule = Callable[[Node, Sequence[Lazy], "RuleContext"], Lazy]
FUSED_RULES: dict[str, FusedRule] = {}


class RuleContext:
    """What a rule may use: the kernel's dim environment and unique names for stages."""

    def __init__(self, env: DimEnv) -> None:
        self.env = env
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"


def register_rule(*ops: str) -> Callable[[FusedRule], FusedRule]:
    def deco(fn: FusedRule) -> FusedRule:
        for op in ops:
            if op in FUSED_RULES:
                raise ValueError(f"tvm fused rule for {op!r} registered twice")
            FUSED_RULES[op] = fn
        return fn
    return deco


def _out(node: Node, ctx: RuleContext, dtype: str | None = None, at=None, **kw) -> Lazy:
    t = node.outputs[0].type
    return Lazy(tuple(ctx.env.shape(t.shape)), tuple(t.shape), dtype or t.dtype, at, **kw)


def _acc_dtype(dtype: str) -> str:
    return "float32" if dtype == "float16" else dtype


# ---------------------------------------------------------------- sources

@register_rule("scalar")
def _scalar(node, xs, ctx):
    return literal(node.attr("value"), node.outputs[0].type.dtype)


@register_rule("arange")
def _arange(node, xs, ctx):
    start, step = ctx.env.dim(node.attr("start")), node.attr("step")
    dt = node.outputs[0].type.dtype
    return _out(node, ctx, at=lambda i: tirx.Cast(dt, start + i[0] * step))


# ---------------------------------------------------------------- elementwise

def _dt(e) -> str:
    return str(e.ty)  # the dtype of a TIR expression


def _erf(x):
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula the interpreter uses
    z = tirx.abs(x)
    one = tirx.const(1.0, _dt(x))
    t = one / (one + tirx.const(0.3275911, _dt(x)) * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    r = one - poly * tirx.exp(-z * z)
    return tirx.Select(x < tirx.const(0.0, _dt(x)), -r, r)


def _sigmoid(x):
    one = tirx.const(1.0, _dt(x))
    return one / (one + tirx.exp(-x))


_UNARY = {
    "neg": lambda x: -x, "abs": tirx.abs, "exp": tirx.exp, "log": tirx.log, "sqrt": tirx.sqrt,
    "rsqrt": lambda x: tirx.const(1.0, _dt(x)) / tirx.sqrt(x), "tanh": tirx.tanh, "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x), "relu": lambda x: tirx.max(x, tirx.const(0, _dt(x))),
    "cos": tirx.cos, "sin": tirx.sin, "erf": _erf, "reciprocal": lambda x: tirx.const(1.0, _dt(x)) / x,
    "logical_not": lambda x: tirx.Not(x),
}


@register_rule(*_UNARY)
def _unary(node, xs, ctx):
    f, x = _UNARY[node.op], xs[0]
    return _out(node, ctx, at=lambda i: f(x.at(i)))


@register_rule("gelu")
def _gelu(node, xs, ctx):
    x = xs[0]
    dt = x.dtype
    c = lambda v: tirx.const(v, dt)
    if node.attr("approximate") == "tanh":
        def at(i):
            v = x.at(i)
            return c(0.5) * v * (c(1.0) + tirx.tanh(c(math.sqrt(2.0 / math.pi)) * (v + c(0.044715) * v * v * v)))
    else:
        def at(i):
            v = x.at(i)
            return c(0.5) * v * (c(1.0) + _erf(v / c(math.sqrt(2.0))))
    return _out(node, ctx, at=at)


def broadcast_at(x: Lazy, out_dims: Sequence) -> Callable:
    """Index function reading ``x`` broadcast (numpy rules) to an output of ``out_dims``."""
    lead = len(out_dims) - x.rank
    keep = [not (d == 1 and out_dims[lead + k] != 1) for k, d in enumerate(x.dims)]
    if x.literal is not None or x.rank == 0:
        return lambda i: x.at(())
    zero = tirx.const(0, "int64")
    return lambda i: x.at([i[lead + k] if keep[k] else zero for k in range(x.rank)])


def _pow(a, b: Lazy):
    if b.literal is not None:
        if b.literal == 2:
            return lambda va: va * va
        if b.literal == 3:  # GPT-2's tanh GELU; CUDA's fast power is NaN for a negative base
            return lambda va: va * va * va
        if b.literal == 1:
            return lambda va: va
        if b.literal == 0.5:
            return lambda va: tirx.sqrt(va)
    return None


def _signed_power(a, b, dt: str):
    """numpy's pow for any base: CUDA's fast power computes exp2(b*log2(a)), NaN for a < 0
    even where b is an integer (x**3 in GPT-2's GELU), so the sign is handled here."""
    a, b = tirx.Cast(dt, a), tirx.Cast(dt, b)
    two, zero = tirx.const(2, dt), tirx.const(0, dt)
    neg = a < zero
    mag = tirx.power(tirx.Select(neg, -a, a), b)
    odd = b - two * tirx.floor(b / two) != zero
    integral = tirx.floor(b) == b
    return tirx.Select(neg, tirx.Select(integral, tirx.Select(odd, -mag, mag), tirx.const(float("nan"), dt)), mag)


_BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": None,  # _signed_power, needs the dtype
    "maximum": tirx.max, "minimum": tirx.min,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "logical_and": tirx.And, "logical_or": tirx.Or,
}


@register_rule(*_BINARY)
def _binary(node, xs, ctx):
    out_dims = node.outputs[0].type.shape
    a, b = (broadcast_at(x, out_dims) for x in xs)
    if node.op == "pow" and (p := _pow(xs[0], xs[1])) is not None:
        return _out(node, ctx, at=lambda i: p(a(i)))
    f = _BINARY[node.op]
    if node.op == "pow":
        dt = node.outputs[0].type.dtype
        return _out(node, ctx, at=lambda i: _signed_power(a(i), b(i), dt))
    return _out(node, ctx, at=lambda i: f(a(i), b(i)))


@register_rule("where")
def _where(node, xs, ctx):
    out_dims = node.outputs[0].type.shape
    c, a, b = (broadcast_at(x, out_dims) for x in xs)
    dt = node.outputs[0].type.dtype
    return _out(node, ctx, at=lambda i: tirx.Select(c(i), tirx.Cast(dt, a(i)), tirx.Cast(dt, b(i))))


@register_rule("cast")
def _cast(node, xs, ctx):
    x, dt = xs[0], node.outputs[0].type.dtype
    if x.literal is not None and dt != "bool":  # stays foldable (pow's exponent after the fp16 rewrite)
        # int() truncates toward zero, as numpy's astype does
        return literal(int(x.literal) if dt.startswith(("int", "uint")) else float(x.literal), dt)
    if dt == "bool":
        return _out(node, ctx, at=lambda i: x.at(i) != tirx.const(0, x.dtype))
    return _out(node, ctx, at=lambda i: tirx.Cast(dt, x.at(i)))


# ---------------------------------------------------------------- reductions

def _reduce(x: Lazy, axes: Sequence[int], keepdims: bool, kind: str, out_dtype: str, ctx: RuleContext,
            out_dims: Sequence) -> Lazy:
    """A materialised reduction over ``axes`` (sum/mean accumulate in float32 for float16)."""
    axes = sorted(a % x.rank for a in axes)
    raxes = [te.reduce_axis((0, x.shape[a]), name=f"r{a}") for a in axes]
    acc = _acc_dtype(x.dtype) if kind in ("sum", "mean") else x.dtype
    out_shape = [x.shape[k] for k in range(x.rank) if k not in axes or keepdims]
    if keepdims:
        out_shape = [tirx.const(1, "int64") if k in axes else x.shape[k] for k in range(x.rank)]

    def src(*i):
        idx, it, r = [], iter(i), iter(raxes)
        for k in range(x.rank):
            if k in axes:
                if keepdims:
                    next(it)
                idx.append(next(r))
            else:
                idx.append(next(it))
        v = x.at(idx)
        return tirx.Cast(acc, v) if acc != x.dtype else v

    reducer = {"sum": te.sum, "mean": te.sum, "max": te.max, "min": te.min}[kind]
    t = te.compute(out_shape, lambda *i: reducer(src(*i), axis=raxes), name=ctx.name(kind))
    count = None
    if kind == "mean":
        count = tirx.const(1, "int64")
        for a in axes:
            count = count * x.shape[a]
    def at(i):
        v = t(*i)
        if count is not None:
            v = v / tirx.Cast(acc, count)
        return tirx.Cast(out_dtype, v) if acc != out_dtype else v
    return Lazy(tuple(out_shape), tuple(out_dims), out_dtype, at)


@register_rule("sum", "mean", "max", "min")
def _reduce_rule(node, xs, ctx):
    t = node.outputs[0].type
    return _reduce(xs[0], node.attr("axes"), bool(node.attr("keepdims")), node.op, t.dtype, ctx, t.shape)


@register_rule("softmax")
def _softmax(node, xs, ctx):
    x = xs[0]
    ax = node.attr("axis") % x.rank
    keep_dims = tuple(1 if k == ax else d for k, d in enumerate(x.dims))
    m = _reduce(x, [ax], True, "max", x.dtype, ctx, keep_dims)
    acc = _acc_dtype(x.dtype)
    zero_ax = lambda i: [tirx.const(0, "int64") if k == ax else i[k] for k in range(x.rank)]
    # a row of -inf (fully masked) keeps max 0 as the interpreter does
    mfin = lambda i: tirx.Select(tirx.isfinite(m.at(zero_ax(i))), m.at(zero_ax(i)), tirx.const(0, x.dtype))
    e = Lazy(x.shape, x.dims, acc, lambda i: tirx.exp(tirx.Cast(acc, x.at(i) - mfin(i))))
    e_t, e = materialize(e, ctx.name("softmax_exp"))
    s = _reduce(e, [ax], True, "sum", acc, ctx, keep_dims)
    dt = node.outputs[0].type.dtype
    return _out(node, ctx, at=lambda i: tirx.Cast(dt, e.at(i) / s.at(zero_ax(i))))


@register_rule("layer_norm")
def _layer_norm(node, xs, ctx):
    x = xs[0]
    last = x.rank - 1
    acc = _acc_dtype(x.dtype)
    keep_dims = x.dims[:-1] + (1,)
    mean = _reduce(x, [last], True, "mean", acc, ctx, keep_dims)
    z = lambda i: list(i[:-1]) + [tirx.const(0, "int64")]
    centered = Lazy(x.shape, x.dims, acc, lambda i: tirx.Cast(acc, x.at(i)) - mean.at(z(i)))
    sq = Lazy(x.shape, x.dims, acc, lambda i: centered.at(i) * centered.at(i))
    var = _reduce(sq, [last], True, "mean", acc, ctx, keep_dims)
    eps = tirx.const(node.attr("eps"), acc)
    dt = node.outputs[0].type.dtype
    w = xs[1] if len(xs) > 1 else None
    b = xs[2] if len(xs) > 2 else None

    def at(i):
        y = centered.at(i) / tirx.sqrt(var.at(z(i)) + eps)
        if w is not None:
            y = y * tirx.Cast(acc, w.at([i[-1]])) + tirx.Cast(acc, b.at([i[-1]]))
        return tirx.Cast(dt, y)
    return _out(node, ctx, at=at)


# ---------------------------------------------------------------- data movement

def _blocks(src: Sequence, dst: Sequence) -> list[tuple[list[int], list[int]]] | None:
    """Pairs of (source axes, destination axes) with equal symbolic size, left to right."""
    out, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        si, dj = [], []
        ps, pd = 1, 1
        if i < len(src):
            si.append(i); ps = sym.mul(ps, src[i]); i += 1
        if j < len(dst):
            dj.append(j); pd = sym.mul(pd, dst[j]); j += 1
        while not sym.dims_equal(ps, pd):
            if i < len(src) and (j >= len(dst) or _smaller(ps, pd)):
                si.append(i); ps = sym.mul(ps, src[i]); i += 1
            elif j < len(dst):
                dj.append(j); pd = sym.mul(pd, dst[j]); j += 1
            else:
                return None
        out.append((si, dj))
    return out


def _smaller(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a < b
    # a symbolic product that still lacks factors of the other side: grow the side whose
    # symbols are a subset of the other's
    sa, sb = sym.symbols(a), sym.symbols(b)
    if sa != sb:
        return sa < sb or not sb < sa and len(sa) <= len(sb)
    return True


@register_rule("reshape")
def _reshape(node, xs, ctx):
    x = xs[0]
    out_dims = node.outputs[0].type.shape
    out_shape = ctx.env.shape(out_dims)
    blocks = _blocks(x.dims, out_dims) or [(list(range(x.rank)), list(range(len(out_dims))))]

    def at(i):
        idx: list = [None] * x.rank
        for sa, da in blocks:
            flat = tirx.const(0, "int64")
            for a in da:
                flat = flat * out_shape[a] + i[a]
            for a in reversed(sa):
                if a == sa[0]:
                    idx[a] = flat
                else:
                    idx[a] = tirx.floormod(flat, x.shape[a])
                    flat = tirx.floordiv(flat, x.shape[a])
        return x.at(idx)
    return _out(node, ctx, at=at)


@register_rule("permute")
def _permute(node, xs, ctx):
    x, perm = xs[0], node.attr("perm")
    def at(i):
        idx: list = [None] * x.rank
        for out_axis, in_axis in enumerate(perm):
            idx[in_axis] = i[out_axis]
        return x.at(idx)
    return _out(node, ctx, at=at)


@register_rule("expand")
def _expand(node, xs, ctx):
    b = broadcast_at(xs[0], node.outputs[0].type.shape)
    return _out(node, ctx, at=b)


@register_rule("slice")
def _slice(node, xs, ctx):
    x = xs[0]
    axis = node.attr("axis") % x.rank
    start, step = ctx.env.dim(node.attr("start")), node.attr("step")
    def at(i):
        idx = list(i)
        idx[axis] = start + i[axis] * step
        return x.at(idx)
    return _out(node, ctx, at=at)


@register_rule("concat")
def _concat(node, xs, ctx):
    axis = node.attr("axis") % xs[0].rank
    offsets, off = [], tirx.const(0, "int64")
    for x in xs:
        offsets.append(off)
        off = off + x.shape[axis]

    def at(i):
        k = len(xs) - 1
        def read(j):
            idx = list(i)
            idx[axis] = i[axis] - offsets[j]
            return xs[j].at(idx)
        v = read(k)
        for j in range(k - 1, -1, -1):
            v = tirx.if_then_else(i[axis] < offsets[j + 1], read(j), v)
        return v
    return _out(node, ctx, at=at)


@register_rule("matmul")
def _matmul(node, xs, ctx):
    """numpy matmul of rank>=2 operands with broadcast batch dims, float32 accumulation.
    Unscheduled (a reduction in a fused kernel): LLM graphs use ``linear`` instead."""
    a, b = xs
    t = node.outputs[0].type
    out_shape = ctx.env.shape(t.shape)
    batch_dims = tuple(t.shape[:-2])
    acc = _acc_dtype(a.dtype)
    rk = te.reduce_axis((0, a.shape[-1]), name="rk")

    def operand_at(x: Lazy, i, row, col):
        lead = len(batch_dims) - (x.rank - 2)
        idx = [i[lead + k] if not (x.dims[k] == 1 and batch_dims[lead + k] != 1) else tirx.const(0, "int64")
               for k in range(x.rank - 2)]
        return x.at(idx + [row, col])

    def body(*i):
        return te.sum(tirx.Cast(acc, operand_at(a, i, i[-2], rk)) * tirx.Cast(acc, operand_at(b, i, rk, i[-1])), axis=rk)

    m = te.compute(out_shape, body, name=ctx.name("matmul"))
    return _out(node, ctx, at=lambda i: tirx.Cast(t.dtype, m(*i)) if acc != t.dtype else m(*i))
