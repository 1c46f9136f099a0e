"""Capture of plain nn.Modules (Linear, norms, activations, residual adds) with torch.fx.

``torch.fx.symbolic_trace`` gives the graph; running it at two batch sizes tells which sizes
follow dim 0 of the inputs: a size that is d at batch B and d + c at batch B + 1 becomes the
symbolic dim ``c*batch + (d - c*B)``. Rules are tables keyed by module type, function and
method name, mirroring the aten table.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..ir import GraphBuilder, Location, Module, TensorTable, TensorType, verify_module
from ..ir import symbolic as sym
from .aten_lowering import LoweringContext, ir_dtype, node_location
from .export_capture import tensor_to_numpy
from .hf_capture import CapturedModel

FxRule = Callable[["FxContext", torch.fx.Node, list[Any]], Any]
MODULE_RULES: dict[type, FxRule] = {}
FUNCTION_RULES: dict[Any, FxRule] = {}
METHOD_RULES: dict[str, FxRule] = {}


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: dict[torch.fx.Node, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.seen[n] = (tuple(out.shape), out.dtype)
        elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            self.seen[n] = [(tuple(o.shape), o.dtype) for o in out]
        else:
            self.seen[n] = out
        return out


class FxContext(LoweringContext):
    def __init__(self, builder: GraphBuilder, gm: torch.fx.GraphModule, at_b: dict, at_b1: dict, batch: int) -> None:
        super().__init__(builder, {})
        self.gm, self.at_b, self.at_b1, self.batch = gm, at_b, at_b1, batch

    def sym_size(self, d0: int, d1: int) -> sym.Dim:
        c = d1 - d0
        return d0 if c == 0 else sym.add(sym.mul(c, "batch"), d0 - c * self.batch)

    def meta_type(self, node: torch.fx.Node) -> TensorType:
        (s0, dtype), (s1, _) = self.at_b[node], self.at_b1[node]
        return TensorType(tuple(self.sym_size(a, b) for a, b in zip(s0, s1)), ir_dtype(dtype, f"at {node.name}"))

    def loc(self) -> Location:
        n = self.node
        if n is not None and n.op == "call_module":
            return Location(str(n.target), node_location(n).source)
        return node_location(n) if n is not None else Location()

    def param_tensor(self, name: str, tensor: torch.Tensor) -> str:
        data = self.b.tensors.get(name)
        return self.b.constant(name, data if data is not None else tensor_to_numpy(tensor), self.loc())


def _rules(table: dict, *keys: Any) -> Callable[[FxRule], FxRule]:
    def deco(fn: FxRule) -> FxRule:
        for k in keys:
            table[k] = fn
        return fn
    return deco


def _unary(op: str) -> FxRule:
    return lambda ctx, n, a: ctx.emit(op, [ctx.value(a[0])])


for _op, _mod, _fns, _meth in [
        ("relu", torch.nn.ReLU, (torch.relu, F.relu), "relu"),
        ("sigmoid", torch.nn.Sigmoid, (torch.sigmoid, F.sigmoid), "sigmoid"),
        ("tanh", torch.nn.Tanh, (torch.tanh, F.tanh), "tanh"),
        ("silu", torch.nn.SiLU, (F.silu,), None),
        ("exp", None, (torch.exp,), "exp"),
        ("neg", None, (torch.neg, operator.neg), "neg"),
        ("rsqrt", None, (torch.rsqrt,), "rsqrt"),
        ("sqrt", None, (torch.sqrt,), "sqrt")]:
    if _mod is not None:
        MODULE_RULES[_mod] = _unary(_op)
    for _f in _fns:
        FUNCTION_RULES[_f] = _unary(_op)
    if _meth:
        METHOD_RULES[_meth] = _unary(_op)


@_rules(MODULE_RULES, torch.nn.GELU)
def _gelu_module(ctx, n, a):
    return ctx.emit("gelu", [ctx.value(a[0])], {"approximate": ctx.gm.get_submodule(n.target).approximate})


@_rules(FUNCTION_RULES, F.gelu)
def _gelu_fn(ctx, n, a):
    return ctx.emit("gelu", [ctx.value(a[0])], {"approximate": n.kwargs.get("approximate", "none")})


@_rules(MODULE_RULES, torch.nn.Dropout, torch.nn.Identity)
def _identity(ctx, n, a):
    return ctx.value(a[0])


@_rules(METHOD_RULES, "contiguous", "clone", "detach")
def _identity_method(ctx, n, a):
    return ctx.value(a[0])


@_rules(MODULE_RULES, torch.nn.Linear)
def _linear_module(ctx, n, a):
    m = ctx.gm.get_submodule(n.target)
    ins = [ctx.value(a[0]), ctx.param_tensor(f"{n.target}.weight", m.weight)]
    if m.bias is not None:
        ins.append(ctx.param_tensor(f"{n.target}.bias", m.bias))
    return ctx.emit("linear", ins)


@_rules(MODULE_RULES, torch.nn.LayerNorm)
def _layer_norm_module(ctx, n, a):
    m = ctx.gm.get_submodule(n.target)
    if len(m.normalized_shape) != 1:
        raise ctx.unsupported("LayerNorm over more than the last dimension")
    ins = [ctx.value(a[0])]
    if m.weight is not None:
        bias = m.bias if m.bias is not None else torch.zeros_like(m.weight)
        ins += [ctx.param_tensor(f"{n.target}.weight", m.weight), ctx.param_tensor(f"{n.target}.bias", bias)]
    return ctx.emit("layer_norm", ins, {"eps": float(m.eps)})


@_rules(MODULE_RULES, torch.nn.RMSNorm)
def _rms_norm_module(ctx, n, a):
    m = ctx.gm.get_submodule(n.target)
    x = ctx.value(a[0])
    dtype = ctx.type_of(x).dtype
    eps = m.eps if m.eps is not None else float(torch.finfo(torch.float32).eps)
    ms = ctx.emit("mean", [ctx.emit("mul", [x, x])], {"axes": (-1,), "keepdims": True})
    y = ctx.emit("mul", [x, ctx.emit("rsqrt", [ctx.emit("add", [ms, ctx.operand(float(eps), dtype)])])])
    return ctx.emit("mul", [y, ctx.param_tensor(f"{n.target}.weight", m.weight)]) if m.weight is not None else y


@_rules(MODULE_RULES, torch.nn.Embedding)
def _embedding_module(ctx, n, a):
    m = ctx.gm.get_submodule(n.target)
    return ctx.emit("embedding", [ctx.param_tensor(f"{n.target}.weight", m.weight), ctx.value(a[0])])


@_rules(MODULE_RULES, torch.nn.Softmax)
def _softmax_module(ctx, n, a):
    x = ctx.value(a[0])
    return ctx.emit("softmax", [x], {"axis": ctx.gm.get_submodule(n.target).dim % ctx.type_of(x).rank})


@_rules(FUNCTION_RULES, F.softmax, torch.softmax)
def _softmax_fn(ctx, n, a):
    x = ctx.value(a[0])
    dim = a[1] if len(a) > 1 else n.kwargs.get("dim")
    if dim is None:
        raise ctx.unsupported("softmax without an explicit dim")
    return ctx.emit("softmax", [x], {"axis": dim % ctx.type_of(x).rank})


_BINARY = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
           operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div"}


@_rules(FUNCTION_RULES, *_BINARY)
def _binary(ctx, n, a):
    if n.kwargs.get("alpha", 1) != 1 or n.kwargs.get("rounding_mode") is not None:
        raise ctx.unsupported("alpha or rounding_mode arguments")
    dtype = ctx.meta_type(n).dtype
    return ctx.emit(_BINARY[n.target], [ctx.operand(a[0], dtype), ctx.operand(a[1], dtype)])


@_rules(FUNCTION_RULES, torch.matmul, operator.matmul)
def _matmul(ctx, n, a):
    return ctx.emit("matmul", [ctx.value(a[0]), ctx.value(a[1])])


@_rules(FUNCTION_RULES, F.linear)
def _linear_fn(ctx, n, a):
    return ctx.emit("linear", [ctx.value(x) for x in a if x is not None])


@_rules(FUNCTION_RULES, torch.cat)
def _cat(ctx, n, a):
    ins = [ctx.value(x) for x in a[0]]
    dim = a[1] if len(a) > 1 else n.kwargs.get("dim", 0)
    return ctx.emit("concat", ins, {"axis": dim % ctx.type_of(ins[0]).rank})


@_rules(METHOD_RULES, "view", "reshape", "flatten", "unsqueeze", "squeeze")
@_rules(FUNCTION_RULES, torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze)
def _reshape(ctx, n, a):
    x = ctx.value(a[0])
    shape = ctx.meta_type(n).shape
    return x if ctx.type_of(x).shape == shape else ctx.emit("reshape", [x], {"shape": shape})


@_rules(METHOD_RULES, "transpose", "permute")
@_rules(FUNCTION_RULES, torch.transpose, torch.permute)
def _permute(ctx, n, a):
    x = ctx.value(a[0])
    rank = ctx.type_of(x).rank
    name = n.target if isinstance(n.target, str) else n.target.__name__
    if name == "permute":
        dims = a[1] if len(a) == 2 and isinstance(a[1], (list, tuple)) else a[1:]
        perm = [d % rank for d in dims]
    else:
        perm = list(range(rank))
        d0, d1 = a[1] % rank, a[2] % rank
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.emit("permute", [x], {"perm": tuple(perm)})


@_rules(METHOD_RULES, "mean", "sum")
@_rules(FUNCTION_RULES, torch.mean, torch.sum)
def _reduce(ctx, n, a):
    x = ctx.value(a[0])
    name = n.target if isinstance(n.target, str) else n.target.__name__
    dims = a[1] if len(a) > 1 else n.kwargs.get("dim")
    rank = ctx.type_of(x).rank
    axes = tuple(range(rank)) if dims is None else tuple(d % rank for d in ([dims] if isinstance(dims, int) else dims))
    keep = a[2] if len(a) > 2 else n.kwargs.get("keepdim", False)
    return ctx.emit(name, [x], {"axes": axes, "keepdims": bool(keep)})


@_rules(METHOD_RULES, "size")
def _size(ctx, n, a):
    return ctx.sym_size(ctx.at_b[n], ctx.at_b1[n]) if isinstance(ctx.at_b[n], int) else None


def _grown(x: Any) -> Any:
    return torch.cat([x, x[:1]], dim=0) if isinstance(x, torch.Tensor) else x


def capture_module(module: torch.nn.Module, example_inputs: tuple[Any, ...]) -> CapturedModel:
    """Traces ``module`` with torch.fx; dim 0 of every input is the symbolic dim ``batch``."""
    if not example_inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in example_inputs):
        raise ValueError("example_inputs must be a non-empty tuple of tensors with a batch dim 0")
    module = module.train(False)  # inference mode (nn.Module.eval)
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:
        raise UnsupportedOpError(type(module).__name__, detail=f"torch.fx cannot trace it: {e}") from e
    batch = int(example_inputs[0].shape[0])
    if any(int(x.shape[0]) != batch for x in example_inputs):
        raise ValueError("all example inputs must share dim 0 (the batch)")
    rec_b, rec_b1 = _Recorder(gm), _Recorder(gm)
    with torch.no_grad():
        rec_b.run(*example_inputs)
        rec_b1.run(*[_grown(x) for x in example_inputs])
    b = GraphBuilder("main")
    ctx = FxContext(b, gm, rec_b.seen, rec_b1.seen, batch)
    results: list[str] = []
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            ctx.env[node] = b.param(str(node.target), ctx.meta_type(node))
        elif node.op == "get_attr":
            ctx.env[node] = ctx.param_tensor(str(node.target), _fetch_attr(gm, str(node.target)))
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            results = [ctx.value(o) for o in outs]
        else:
            if node.op == "call_module":
                table, key = MODULE_RULES, type(gm.get_submodule(node.target))
            elif node.op == "call_function":
                table, key = FUNCTION_RULES, node.target
            else:
                table, key = METHOD_RULES, node.target
            rule = table.get(key)
            if rule is None:
                name = getattr(key, "__name__", str(key))
                raise UnsupportedOpError(f"{node.op} {name}", module_path=ctx.loc().module_path,
                                         source=ctx.loc().source, detail="no torch.fx lowering rule")
            value = rule(ctx, node, list(node.args))
            if isinstance(value, str) and isinstance(rec_b.seen.get(node), tuple):
                ctx.check(node, value)
            ctx.env[node] = value
    fn = b.function(results)
    module_ir = verify_module(Module((fn,), TensorTable(b.tensors), {"kind": "module",
                                                                    "model_name": type(module).__name__}))
    return CapturedModel(module_ir)


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
