"""Lowering of torch.export (aten) graphs into the bitsmith IR.

One lowering rule per aten overload, registered in ``ATEN_RULES``; a node without a rule
raises UnsupportedOpError naming the aten op, the module path and the model's source line.
Output types come from the IR's own inference and are cross-checked against the shapes
torch.export recorded, so a wrong rule fails at capture, not at run time.
"""

from __future__ import annotations

import operator
import os
import re
from typing import Any, Callable

import numpy as np
import sympy
import torch
import torch.fx

from ..errors import UnsupportedOpError
from ..ir import GraphBuilder, Location, TensorType
from ..ir import symbolic as sym
from ..ir.types import IRTypeError

aten = torch.ops.aten
Rule = Callable[["LoweringContext", torch.fx.Node], Any]
ATEN_RULES: dict[Any, Rule] = {}

TORCH_TO_DTYPE = {
    torch.float32: "float32", torch.float16: "float16", torch.float64: "float64",
    torch.int64: "int64", torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool",
}
_BIG = 1 << 62  # torch writes "to the end" as sys.maxsize
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def lowers(*targets: Any) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for t in targets:
            ATEN_RULES[t] = fn
        return fn
    return deco


def ir_dtype(dtype: torch.dtype, where: str = "") -> str:
    try:
        return TORCH_TO_DTYPE[dtype]
    except KeyError:
        raise UnsupportedOpError(f"dtype {dtype}", detail=f"no IR dtype for it {where}".strip()) from None


def node_location(node: torch.fx.Node, strip_prefix: str = "") -> Location:
    """Module path from nn_module_stack, source line from the innermost non-torch frame."""
    path = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if strip_prefix and path.startswith(strip_prefix):
            path = path[len(strip_prefix):]
        elif strip_prefix and path + "." == strip_prefix:
            path = ""
    source = ""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    for file, line in reversed(frames):
        if not file.startswith(_TORCH_DIR):
            source = f"{file}:{line}"
            break
    if not source and frames:
        source = f"{frames[-1][0]}:{frames[-1][1]}"
    return Location(path, source)


class LoweringContext:
    """State while lowering one fx graph: the builder and fx-node → IR value map."""

    def __init__(self, builder: GraphBuilder, symbols: dict[sympy.Symbol, str], module_prefix: str = "") -> None:
        self.b = builder
        self.env: dict[torch.fx.Node, Any] = {}
        self.symbols = symbols
        self.module_prefix = module_prefix
        self.node: torch.fx.Node | None = None

    # -- conversions
    def dim(self, d: Any) -> sym.Dim:
        if isinstance(d, torch.fx.Node):
            d = self.env[d] if d in self.env else d.meta["val"]
            if isinstance(d, (int, str)):
                return d
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            if expr.is_number:
                return int(expr)
            unknown = [s for s in expr.free_symbols if s not in self.symbols]
            if unknown:
                raise self.unsupported(f"symbolic size {expr} uses symbols not tied to an input dim")
            renamed = expr.xreplace({s: sympy.Symbol(self.symbols[s]) for s in expr.free_symbols})
            try:
                return sym.canonical(str(renamed).replace(" ", ""))
            except sym.SymbolicDimError as e:
                raise self.unsupported(f"symbolic size {expr} is not a polynomial: {e}") from None
        raise self.unsupported(f"cannot read a dimension from {d!r}")

    def meta_type(self, node: torch.fx.Node) -> TensorType:
        val = node.meta["val"]
        return TensorType(tuple(self.dim(d) for d in val.shape), ir_dtype(val.dtype, f"at {node.name}"))

    def value(self, arg: Any) -> str:
        v = self.env[arg]
        if not isinstance(v, str):
            raise self.unsupported(f"expected a tensor operand, got {v!r}")
        return v

    def type_of(self, value: str) -> TensorType:
        return self.b.types[value]

    def loc(self) -> Location:
        return node_location(self.node, self.module_prefix) if self.node is not None else Location()

    def unsupported(self, detail: str) -> UnsupportedOpError:
        n = self.node
        loc = self.loc()
        return UnsupportedOpError(str(n.target) if n is not None else "?", module_path=loc.module_path,
                                  source=loc.source, detail=detail)

    # -- emitting
    def emit(self, op: str, inputs: list[str], attrs: dict | None = None) -> str:
        try:
            return self.b.op(op, inputs, attrs, self.loc())
        except IRTypeError as e:
            raise self.unsupported(f"lowering to {op} failed: {e}") from e

    def cast(self, value: str, dtype: str) -> str:
        return value if self.type_of(value).dtype == dtype else self.emit("cast", [value], {"dtype": dtype})

    def operand(self, arg: Any, dtype: str) -> str:
        """A tensor operand cast to ``dtype``, or a Python number as a scalar node."""
        if isinstance(arg, torch.fx.Node):
            return self.cast(self.value(arg), dtype)
        if isinstance(arg, (bool, int, float)):
            value = bool(arg) if dtype == "bool" else (float(arg) if dtype.startswith("float") else int(arg))
            return self.emit("scalar", [], {"value": value, "dtype": dtype})
        raise self.unsupported(f"unsupported operand {arg!r}")

    def check(self, node: torch.fx.Node, value: str) -> str:
        """Cross-checks the IR's inferred type against torch.export's recorded one."""
        want = self.meta_type(node)
        got = self.type_of(value)
        if got.dtype != want.dtype or len(got.shape) != len(want.shape) or not all(
                sym.dims_equal(a, b) for a, b in zip(got.shape, want.shape)):
            raise self.unsupported(f"lowered type {got} differs from torch's {want}")
        return value


# ---------------------------------------------------------------- identity-like

@lowers(aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
        aten.lift_fresh_copy.default, aten.dropout.default)
def _identity(ctx, n):
    if n.target == aten.dropout.default and len(n.args) > 2 and n.args[2]:
        raise ctx.unsupported("dropout in training mode; switch the model to inference mode (model.train(False)) first")
    return ctx.value(n.args[0])


@lowers(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default)
def _to(ctx, n):
    return ctx.cast(ctx.value(n.args[0]), ctx.meta_type(n).dtype)


# ---------------------------------------------------------------- elementwise

_UNARY = {aten.rsqrt.default: "rsqrt", aten.neg.default: "neg", aten.cos.default: "cos",
          aten.sin.default: "sin", aten.exp.default: "exp", aten.log.default: "log",
          aten.sqrt.default: "sqrt", aten.tanh.default: "tanh", aten.sigmoid.default: "sigmoid",
          aten.silu.default: "silu", aten.relu.default: "relu", aten.abs.default: "abs",
          aten.erf.default: "erf", aten.reciprocal.default: "reciprocal"}


@lowers(*_UNARY)
def _unary(ctx, n):
    return ctx.emit(_UNARY[n.target], [ctx.operand(n.args[0], ctx.meta_type(n).dtype)])


@lowers(aten.gelu.default)
def _gelu(ctx, n):
    return ctx.emit("gelu", [ctx.value(n.args[0])], {"approximate": n.kwargs.get("approximate", "none")})


_BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul",
           aten.div.Tensor: "div", aten.pow.Tensor_Scalar: "pow", aten.pow.Tensor_Tensor: "pow",
           aten.maximum.default: "maximum", aten.minimum.default: "minimum",
           aten.add.Scalar: "add", aten.sub.Scalar: "sub", aten.mul.Scalar: "mul", aten.div.Scalar: "div"}


@lowers(*_BINARY)
def _binary(ctx, n):
    if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None:
        raise ctx.unsupported("alpha or rounding_mode arguments")
    dtype = ctx.meta_type(n).dtype
    return ctx.emit(_BINARY[n.target], [ctx.operand(n.args[0], dtype), ctx.operand(n.args[1], dtype)])


# ---------------------------------------------------------------- reductions

def _reduce_axes(ctx, n, dims) -> tuple[int, ...]:
    rank = ctx.type_of(ctx.value(n.args[0])).rank
    if dims is None or dims == []:
        return tuple(range(rank))
    return tuple(d % rank for d in ([dims] if isinstance(dims, int) else dims))


@lowers(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
def _reduce(ctx, n):
    op = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "max",
          aten.amin.default: "min"}[n.target]
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    x = ctx.cast(ctx.value(n.args[0]), ctx.meta_type(n).dtype)
    return ctx.emit(op, [x], {"axes": _reduce_axes(ctx, n, dims), "keepdims": bool(keep)})


@lowers(aten.softmax.int, aten._softmax.default)
def _softmax(ctx, n):
    x = ctx.cast(ctx.value(n.args[0]), ctx.meta_type(n).dtype)
    return ctx.emit("softmax", [x], {"axis": n.args[1] % ctx.type_of(x).rank})


# ---------------------------------------------------------------- linear algebra

@lowers(aten.linear.default)
def _linear(ctx, n):
    args = [ctx.value(a) for a in n.args if a is not None]
    return ctx.emit("linear", args)


@lowers(aten.addmm.default)
def _addmm(ctx, n):
    """GPT-2's Conv1D: addmm(bias, x, W[in, out]). With a constant W we store W.T and emit a
    plain ``linear`` so every projection looks alike to the passes."""
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        raise ctx.unsupported("addmm with beta/alpha")
    bias, x, w = n.args
    w_name = ctx.value(w)
    producer = next((nd for nd in ctx.b.nodes if nd.outputs[0].name == w_name), None)
    if producer is not None and producer.op == "constant":
        tname = producer.attr("name") + ".T"
        data = ctx.b.tensors.get(tname)
        if data is None:
            data = np.ascontiguousarray(ctx.b.tensors[producer.attr("name")].T)
        wt = ctx.b.constant(tname, data, ctx.loc())
        return ctx.emit("linear", [ctx.value(x), wt, ctx.value(bias)])
    return ctx.emit("add", [ctx.emit("matmul", [ctx.value(x), w_name]), ctx.value(bias)])


@lowers(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(ctx, n):
    return ctx.emit("matmul", [ctx.value(n.args[0]), ctx.value(n.args[1])])


@lowers(aten.embedding.default)
def _embedding(ctx, n):
    return ctx.emit("embedding", [ctx.value(n.args[0]), ctx.value(n.args[1])])


@lowers(aten.layer_norm.default)
def _layer_norm(ctx, n):
    x, shape = n.args[0], n.args[1]
    w = n.args[2] if len(n.args) > 2 else None
    b = n.args[3] if len(n.args) > 3 else None
    eps = n.args[4] if len(n.args) > 4 else 1e-5
    if len(shape) != 1:
        raise ctx.unsupported("layer_norm over more than the last dimension")
    if (w is None) != (b is None):
        raise ctx.unsupported("layer_norm with only one of weight and bias")
    inputs = [ctx.value(x)] + ([ctx.value(w), ctx.value(b)] if w is not None else [])
    return ctx.emit("layer_norm", inputs, {"eps": float(eps)})


@lowers(torch.ops.bitsmith.causal_attention.default)
def _attention(ctx, n):
    q, k, v, scale = n.args
    return ctx.emit("attention", [ctx.value(q), ctx.value(k), ctx.value(v)],
                    {"scale": float(scale), "causal": True})


# ---------------------------------------------------------------- data movement

@lowers(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
        aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints)
def _reshape(ctx, n):
    x = ctx.value(n.args[0])
    shape = ctx.meta_type(n).shape
    if ctx.type_of(x).shape == shape:
        return x
    return ctx.emit("reshape", [x], {"shape": shape})


@lowers(aten.expand.default)
def _expand(ctx, n):
    x = ctx.value(n.args[0])
    shape = ctx.meta_type(n).shape
    return x if ctx.type_of(x).shape == shape else ctx.emit("expand", [x], {"shape": shape})


@lowers(aten.transpose.int, aten.permute.default, aten.t.default)
def _permute(ctx, n):
    x = ctx.value(n.args[0])
    rank = ctx.type_of(x).rank
    if rank < 2 and n.target != aten.permute.default:
        return x  # transposing a 0-d or 1-d tensor is the identity
    if n.target == aten.permute.default:
        perm = [p % rank for p in n.args[1]]
    else:
        d0, d1 = (n.args[1] % rank, n.args[2] % rank) if n.target == aten.transpose.int else (0, 1)
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return x if perm == list(range(rank)) else ctx.emit("permute", [x], {"perm": tuple(perm)})


def _bound(ctx, value: Any, size: sym.Dim, default: sym.Dim) -> sym.Dim:
    """Normalizes a slice bound the way Python does (negative from the end, clamped)."""
    if value is None:
        return default
    if isinstance(value, torch.fx.Node):
        return ctx.dim(value)
    if value >= _BIG:
        return size
    if value < 0:
        value = sym.add(size, value) if not isinstance(size, int) else max(size + value, 0)
        return value
    if isinstance(size, int):
        return min(value, size)
    return value


def emit_slice(ctx, x: str, axis: int, start: Any, end: Any, step: int) -> str:
    t = ctx.type_of(x)
    axis %= t.rank
    size = t.shape[axis]
    lo, hi = _bound(ctx, start, size, 0), _bound(ctx, end, size, size)
    if lo == 0 and sym.dims_equal(hi, size) and step == 1:
        return x
    return ctx.emit("slice", [x], {"axis": axis, "start": lo, "end": hi, "step": step})


@lowers(aten.slice.Tensor)
def _slice(ctx, n):
    args = list(n.args) + [None] * (5 - len(n.args))
    x, axis, start, end, step = args[:5]
    return emit_slice(ctx, ctx.value(x), axis or 0, start, end, step or 1)


@lowers(aten.select.int)
def _select(ctx, n):
    x, axis, index = n.args
    x = ctx.value(x)
    t = ctx.type_of(x)
    axis %= t.rank
    if index < 0:
        index = sym.add(t.shape[axis], index)
    s = ctx.emit("slice", [x], {"axis": axis, "start": index, "end": sym.add(index, 1), "step": 1})
    return ctx.emit("reshape", [s], {"shape": ctx.meta_type(n).shape})


@lowers(aten.cat.default)
def _cat(ctx, n):
    dtype = ctx.meta_type(n).dtype
    inputs = [ctx.cast(ctx.value(a), dtype) for a in n.args[0]]
    axis = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return inputs[0] if len(inputs) == 1 else ctx.emit("concat", inputs, {"axis": axis % ctx.type_of(inputs[0]).rank})


@lowers(aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx, n):
    x = ctx.value(n.args[0])
    axis = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % ctx.type_of(x).rank
    parts, start = [], 0
    for piece in n.meta["val"]:
        length = ctx.dim(piece.shape[axis])
        end = sym.add(start, length)
        parts.append(emit_slice(ctx, x, axis, start, end, 1))
        start = end
    return parts


@lowers(operator.getitem)
def _getitem(ctx, n):
    seq, index = n.args
    return ctx.env[seq][index]


@lowers(aten.sym_size.int)
def _sym_size(ctx, n):
    return ctx.dim(n.meta["val"])
