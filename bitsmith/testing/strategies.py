"""Hypothesis strategies for random, valid bitsmith IR modules (public: pass and backend tests use them).

``random_modules()`` draws ``(module, example_args)``: a verified single-function module built
with ``GraphBuilder`` and numpy inputs that fit its parameters, symbolic dims bound to small
sizes. The graphs mix elementwise chains, scalars, reductions, softmax, linear/matmul with
constant weights, data movement, an optional embedding lookup, duplicated subexpressions
(work for CSE) and nodes no result uses (work for DCE). Values stay in a tame range (no exp,
log or div) so interpreter comparisons do not drown in inf/nan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from bitsmith.ir import GraphBuilder, Location, Module, TensorType, Value, verify_module
from bitsmith.ir.ops import broadcast_shapes
from bitsmith.ir.symbolic import mul
from bitsmith.ir.types import IRTypeError

UNARY = ("neg", "abs", "tanh", "sigmoid", "silu", "relu", "sin", "cos", "erf")
BINARY = ("add", "sub", "mul", "maximum", "minimum")
REDUCE = ("sum", "mean", "max", "min")
STEPS = ("unary", "unary", "binary", "binary", "scalar", "gelu", "reduce", "softmax", "linear",
         "matmul", "reshape", "permute", "slice", "concat", "where", "duplicate", "constant")

name_parts = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=6)
tensor_names = st.lists(name_parts, min_size=1, max_size=4).map(".".join)
locations = st.none() | st.builds(
    Location, tensor_names, st.sampled_from(["", "modeling_llama.py:123", "a b.py:7", 'q"x.py:1']))


@dataclass(frozen=True)
class Dims:
    """The batch and sequence dims of a module: each symbolic or static, with its test size."""

    batch: int | str
    seq: int | str
    bindings: dict[str, int]


@st.composite
def dims(draw: st.DrawFn, static: bool = False) -> Dims:
    """``static``: concrete sizes only (for backends that compile fixed shapes)."""
    bindings: dict[str, int] = {}
    out = []
    for symbol in ("batch", "seq"):
        size = draw(st.integers(1, 3))
        if not static and draw(st.booleans()):
            bindings[symbol] = size
            out.append(symbol)
        else:
            out.append(size)
    return Dims(out[0], out[1], bindings)


def _float_values(b: GraphBuilder) -> list[str]:
    return [v for v, t in b.types.items() if t.dtype == "float32"]


def _compatible(b: GraphBuilder, a: str) -> list[str]:
    out = []
    for v in _float_values(b):
        try:
            broadcast_shapes(b.types[a].shape, b.types[v].shape)
            out.append(v)
        except IRTypeError:
            pass
    return out


def _constant(draw: st.DrawFn, b: GraphBuilder, shape: tuple[int, ...], loc: Location | None = None) -> str:
    """A new float32 constant under a fresh dotted name."""
    name = draw(tensor_names)
    while name in b.tensors:
        name += "_"
    data = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(-1, 1, shape)
    return b.constant(name, data.astype(np.float32), loc)


def _step(draw: st.DrawFn, b: GraphBuilder, kind: str, loc: Location | None) -> None:
    vals = _float_values(b)
    a = draw(st.sampled_from(vals))
    t = b.types[a]
    if kind == "unary":
        b.op(draw(st.sampled_from(UNARY)), [a], loc=loc)
    elif kind == "gelu":
        b.op("gelu", [a], {"approximate": draw(st.sampled_from(["none", "tanh"]))}, loc=loc)
    elif kind == "binary":
        b.op(draw(st.sampled_from(BINARY)), [a, draw(st.sampled_from(_compatible(b, a)))], loc=loc)
    elif kind == "where":
        other = draw(st.sampled_from(_compatible(b, a)))
        cond = b.op(draw(st.sampled_from(["gt", "le", "ne"])), [a, other])
        b.op("where", [cond, a, other], loc=loc)
    elif kind == "scalar":
        s = b.scalar(draw(st.floats(-2, 2, allow_nan=False, width=32)), "float32")
        b.op(draw(st.sampled_from(BINARY)), draw(st.permutations([a, s])), loc=loc)
    elif kind == "reduce" and t.rank >= 1:
        axes = draw(st.lists(st.integers(-t.rank, t.rank - 1), min_size=1, max_size=2,
                             unique_by=lambda x: x % t.rank))
        b.op(draw(st.sampled_from(REDUCE)), [a], {"axes": tuple(axes), "keepdims": draw(st.booleans())}, loc=loc)
    elif kind == "softmax" and t.rank >= 1:
        b.op("softmax", [a], {"axis": draw(st.integers(-t.rank, t.rank - 1))}, loc=loc)
    elif kind in ("linear", "matmul") and t.rank >= (1 if kind == "linear" else 2) and isinstance(t.shape[-1], int):
        k, n = t.shape[-1], draw(st.integers(1, 4))
        shape = (n, k) if kind == "linear" else (k, n)
        w = _constant(draw, b, shape)
        inputs = [a, w]
        if kind == "linear" and draw(st.booleans()):
            inputs.append(_constant(draw, b, (n,)))
        b.op(kind, inputs, loc=loc)
    elif kind == "reshape" and t.rank >= 2:
        if draw(st.booleans()):  # flatten the last two dims: yields products like "batch*seq"
            shape = t.shape[:-2] + (mul(t.shape[-2], t.shape[-1]),)
        else:  # insert a unit dim
            i = draw(st.integers(0, t.rank))
            shape = t.shape[:i] + (1,) + t.shape[i:]
        b.op("reshape", [a], {"shape": shape}, loc=loc)
    elif kind == "permute" and t.rank >= 2:
        b.op("permute", [a], {"perm": tuple(draw(st.permutations(range(t.rank))))}, loc=loc)
    elif kind == "slice" and t.rank >= 1:
        axis = draw(st.integers(0, t.rank - 1))
        d = t.shape[axis]
        if isinstance(d, int) and d >= 2:
            start = draw(st.integers(0, d - 1))
            end = draw(st.integers(start + 1, d))
            step = draw(st.integers(1, 2))
        else:  # a full slice of a symbolic dim: an identity that simplification may remove
            start, end, step = 0, d, 1
        b.op("slice", [a], {"axis": axis, "start": start, "end": end, "step": step}, loc=loc)
    elif kind == "concat" and t.rank >= 1:
        same = [v for v in vals if b.types[v].shape == t.shape]
        others = draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
        b.op("concat", [a] + others, {"axis": draw(st.integers(-t.rank, t.rank - 1))}, loc=loc)
    elif kind == "duplicate":
        nodes = [n for n in b.nodes if len(n.outputs) == 1]
        n = draw(st.sampled_from(nodes)) if nodes else None
        if n is not None:  # same op, inputs and attrs under a new name: a CSE opportunity
            out = b.fresh()
            b.nodes.append(n.replace(outputs=(Value(out, n.output.type),)))
            b.types[out] = n.output.type
    elif kind == "constant":
        shape = tuple(draw(st.sampled_from([1, 2, 3])) for _ in range(draw(st.integers(1, 2))))
        _constant(draw, b, shape, loc)


@st.composite
def random_modules(draw: st.DrawFn, max_steps: int = 12, static: bool = False) -> tuple[Module, list[np.ndarray]]:
    """A verified module ``main`` and example inputs for it (float32, plus int64 ids if any);
    ``static``: every parameter of concrete shape."""
    d = draw(dims(static))
    feat = draw(st.integers(1, 4))
    b = GraphBuilder("main")
    b.param("x", TensorType((d.batch, d.seq, feat), "float32"))
    extra = draw(st.sampled_from([None, (feat,), (d.seq, feat), (d.batch, d.seq, feat), (d.batch, 1, 1)]))
    if extra is not None:
        b.param("y", TensorType(extra, "float32"))
    vocab = draw(st.integers(2, 5))
    if draw(st.booleans()):
        ids = b.param("ids", TensorType((d.batch, d.seq), "int64"))
        table = _constant(draw, b, (vocab, feat))
        b.op("embedding", [table, ids])
    for kind in draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=max_steps)):
        _step(draw, b, kind, draw(locations))
    if not b.nodes:  # every drawn step may have been inapplicable
        b.op("neg", ["x"])
    candidates = [v for v in b.types if v not in {p.name for p in b.params}]
    results = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True))
    attrs = draw(st.sampled_from([{}, {"kind": "causal_lm", "num_layers": 2}]))
    module = verify_module(b.module(results, attrs))

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    args = []
    for p in module.functions[0].params:
        shape = p.type.concrete(d.bindings)
        if p.type.dtype == "int64":
            args.append(rng.integers(0, vocab, shape).astype(np.int64))
        else:
            args.append(rng.uniform(-2, 2, shape).astype(np.float32))
    return module, args


# ---------------------------------------------------------------- modules with calls

def outline_range(module: Module, fn_name: str, start: int, stop: int, callee_name: str,
                  attrs: dict | None = None, rename_symbols: bool = False) -> Module:
    """Moves nodes ``start:stop`` of a function into a new function called in their place.

    A contiguous range of a topological order is convex (a path leaving it and coming back
    would pass a node between its ends), so the result is acyclic by construction; this
    outliner is independent of the ``partition`` pass it helps test. Values read from outside
    become parameters, values read after the range, returned or read by nothing become
    results. With ``rename_symbols`` the callee spells the symbols its parameters bind as
    plain dims differently (``seq`` -> ``seq_c``), so calls must bind them.
    """
    from bitsmith.ir import Function, Node
    from bitsmith.ir import symbolic as sym
    from bitsmith.ir.ops import OPS

    fn = module.function(fn_name)
    inner, after = fn.nodes[start:stop], fn.nodes[stop:]
    defined = {o.name for n in inner for o in n.outputs}
    read_after = {i for n in after for i in n.inputs} | set(fn.results)
    read_inside = {i for n in inner for i in n.inputs}
    types = fn.value_types()
    inputs = list(dict.fromkeys(i for n in inner for i in n.inputs if i not in defined))
    outputs = [o for n in inner for o in n.outputs if o.name in read_after or o.name not in read_inside]
    plain = {d for v in inputs for d in types[v].shape if isinstance(d, str) and sym.SYMBOL_NAME.match(d)}
    rename = {s: f"{s}_c" for s in plain} if rename_symbols else {}

    def re_type(t: TensorType) -> TensorType:
        return TensorType(tuple(sym.substitute(d, rename) for d in t.shape), t.dtype)

    def re_node(n: Node) -> Node:
        dims = OPS[n.op].dim_attrs
        attrs_ = tuple((k, tuple(sym.substitute(x, rename) if isinstance(x, str) else x for x in v)
                        if k in dims and isinstance(v, tuple) else
                        (sym.substitute(v, rename) if k in dims and isinstance(v, str) else v)) for k, v in n.attrs)
        return n.replace(outputs=tuple(Value(o.name, re_type(o.type)) for o in n.outputs), attrs=attrs_)

    callee = Function(callee_name, tuple(Value(v, re_type(types[v])) for v in inputs),
                      tuple(re_node(n) for n in inner), tuple(o.name for o in outputs), attrs or {})
    call = Node("call", tuple(inputs), tuple(outputs), (("callee", callee_name),), inner[0].loc)
    caller = fn.replace(nodes=fn.nodes[:start] + (call,) + after)
    return module.replace(functions=tuple(caller if f.name == fn_name else f for f in module.functions) + (callee,))


@st.composite
def modules_with_calls(draw: st.DrawFn, max_steps: int = 12) -> tuple[Module, Module, list[np.ndarray]]:
    """``(with_calls, original, args)``: a random module and the same graph with one or two
    random contiguous ranges outlined into callees (perhaps nested, perhaps with the callee's
    symbols renamed, with random function attributes); both verify and compute the same."""
    original, args = draw(random_modules(max_steps=max_steps))
    module, caller = original, "main"
    for depth in range(draw(st.integers(1, 2))):
        n = len(module.function(caller).nodes)
        start = draw(st.integers(0, n - 1))
        stop = draw(st.integers(start + 1, n))
        name = draw(st.sampled_from(["sub", "attention.0", "f-1"])) + f"_{depth}"
        attrs = draw(st.sampled_from([{}, {"device": "attention"}, {"codegen": "fpga", "lanes": 4}]))
        module = outline_range(module, caller, start, stop, name, attrs, draw(st.booleans()))
        caller = name
    return verify_module(module), original, args
