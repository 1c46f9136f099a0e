"""The reference interpreter: numpy semantics for every IR op.

This is the oracle that passes and backends are tested against, so each rule is written
for clarity, and it must carry less error than the fp32 kernels it judges, on any CPU.

Accuracy scheme: every op's result is rounded once, at the op boundary, to the node's
declared dtype; in between, floating-point work is done in float64:
  - ops that accumulate (matmul, linear, qlinear, attention, layer_norm, sum/mean, softmax)
    multiply and sum in float64. A float32 product is exact in float64 (24+24 < 53 bits) and
    a float64 sum of K terms is off by at most ~K*2^-53*sum|terms| (Higham, Accuracy and
    Stability of Numerical Algorithms, 4.2), i.e. <= 2^-41*sum|terms| for K <= 4096: far
    below float32's 2^-24 rounding unless the sum cancels by more than 2^17. So the result is
    the exact value rounded to float32 (up to that tiny term), whatever the BLAS kernel or
    instruction set. fp32 BLAS instead leaves errors that grow with K and depend on the
    kernel's blocking (numpy's OpenBLAS on AVX-512 and on AVX2 give different results);
  - composite or transcendental elementwise ops (exp, log, sqrt, rsqrt, tanh, sigmoid, silu,
    sin, cos, pow, gelu) are evaluated in float64 and rounded once, so they are within
    ~0.5 ulp in float32 and do not depend on numpy's per-ISA float32 SIMD approximations
    (erf uses Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 absolute);
  - single IEEE operations (add, sub, mul, div, neg, abs, max, min, comparisons) are
    correctly rounded in the IR dtype already and run there.
Nodes declared float64 therefore get plain float64 arithmetic (no wider type is used).
Measured on SmolLM2-135M against a float64 torch run: 2.6e-5 max abs logit error on AVX-512
and AVX2 alike, vs 4.7e-5 for torch fp32 (was 1.16e-4 / 7.6e-5 with fp32 accumulation). Cost:
float64 GEMMs take ~2x float32 ones, so the reference target is ~1.6x (prefill) to ~2.1x
(decode) slower single-threaded; weights are converted per call, not cached (a cached float64
copy doubled memory and was no faster). Details: benchmarks/results/oracle_accuracy.md.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import BitsmithError
from . import symbolic as sym
from .graph import Function, Module, Node
from .types import numpy_dtype

Impl = Callable[[Sequence[np.ndarray], Node, "EvalContext"], Sequence[np.ndarray]]
RULES: dict[str, Impl] = {}


class InterpreterError(BitsmithError, RuntimeError):
    """An op could not be evaluated; the message names the node and its location."""


class EvalContext:
    """Per-call state: the module's tensors and the values bound to symbolic dims, plus the
    ``observe`` and ``overrides`` of the run, which a ``call`` hands on to its callee."""

    def __init__(self, module: Module, bindings: dict[str, int],
                 observe: Callable[[Node, Sequence[np.ndarray]], None] | None = None,
                 overrides: Mapping[str, Impl] | None = None) -> None:
        self.module = module
        self.bindings = bindings
        self.observe = observe
        self.overrides = overrides

    def dim(self, d: sym.Dim) -> int:
        return d if isinstance(d, int) else sym.evaluate(d, self.bindings)

    def shape(self, dims: Sequence[sym.Dim]) -> tuple[int, ...]:
        return tuple(self.dim(d) for d in dims)


def rule(*names: str) -> Callable[[Impl], Impl]:
    def deco(fn: Impl) -> Impl:
        for n in names:
            if n in RULES:
                raise ValueError(f"interpreter rule for {n!r} registered twice")
            RULES[n] = fn
        return fn

    return deco


def _out_dtype(node: Node, i: int = 0) -> np.dtype:
    return numpy_dtype(node.outputs[i].type.dtype)


def wide(x: np.ndarray) -> np.ndarray:
    """``x`` in float64 if it is floating point (the interpreter's working precision), else as is."""
    return x.astype(np.float64, copy=False) if x.dtype.kind == "f" else x


def wide_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` with products and sums in float64 when either operand is floating point.

    The caller rounds once to the IR dtype. Integer operands stay integer (exact already).
    """
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.matmul(a.astype(np.float64, copy=False), b.astype(np.float64, copy=False))
    return np.matmul(a, b)


# ---------------------------------------------------------------- sources

@rule("constant")
def _constant(xs, node, ctx):
    return [ctx.module.tensors[node.attr("name")]]


@rule("scalar")
def _scalar(xs, node, ctx):
    return [np.array(node.attr("value"), dtype=_out_dtype(node))]


@rule("arange")
def _arange(xs, node, ctx):
    return [np.arange(ctx.dim(node.attr("start")), ctx.dim(node.attr("end")), node.attr("step"),
                      dtype=_out_dtype(node))]


# ---------------------------------------------------------------- elementwise

def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 in float64: |error| < 1.5e-7, far below fp32 test tolerances.
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-z * z))).astype(x.dtype)


def _one_plus_exp_neg(x: np.ndarray) -> np.ndarray:
    # exp(-x) overflows to inf for very negative x, which gives sigmoid's correct limit 0
    e = np.negative(x, out=np.empty_like(x))
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1
    return e


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = _one_plus_exp_neg(x)
    return np.reciprocal(e, out=e)


def _silu(x: np.ndarray) -> np.ndarray:
    e = _one_plus_exp_neg(x)
    return np.divide(x, e, out=e)


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
    "rsqrt": lambda x: (1 / np.sqrt(x)).astype(x.dtype), "tanh": np.tanh, "sigmoid": _sigmoid,
    "silu": _silu, "relu": lambda x: np.maximum(x, x.dtype.type(0)),
    "cos": np.cos, "sin": np.sin, "erf": _erf, "reciprocal": lambda x: (1 / x).astype(x.dtype),
    "logical_not": np.logical_not,
}


# Correctly rounded (or exact) in the IR dtype already; the rest are evaluated in float64.
_EXACT_UNARY = frozenset({"neg", "abs", "relu", "reciprocal", "logical_not"})


@rule(*_UNARY)
def _unary(xs, node, ctx):
    x = xs[0] if node.op in _EXACT_UNARY else wide(xs[0])
    return [np.asarray(_UNARY[node.op](x), dtype=_out_dtype(node))]


@rule("gelu")
def _gelu(xs, node, ctx):
    x = wide(xs[0])
    if node.attr("approximate") == "tanh":
        inner = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)
        y = 0.5 * x * (1.0 + np.tanh(inner))
    else:
        y = 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0).astype(x.dtype)))
    return [np.asarray(y, dtype=_out_dtype(node))]


_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or,
}


@rule(*_BINARY)
def _binary(xs, node, ctx):
    a, b = xs
    if node.op == "pow":  # powf is not correctly rounded; in float64 it rounds once
        a, b = wide(a), wide(b)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return [np.asarray(_BINARY[node.op](a, b), dtype=_out_dtype(node))]


@rule("where")
def _where(xs, node, ctx):
    return [np.where(xs[0], xs[1], xs[2]).astype(_out_dtype(node))]


@rule("cast")
def _cast(xs, node, ctx):
    return [xs[0].astype(_out_dtype(node))]


# ---------------------------------------------------------------- reductions

_REDUCE = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}


@rule(*_REDUCE)
def _reduce(xs, node, ctx):
    axes = tuple(a % xs[0].ndim for a in node.attr("axes"))
    x = wide(xs[0]) if node.op in ("sum", "mean") else xs[0]  # max/min round nothing
    y = _REDUCE[node.op](x, axis=axes, keepdims=bool(node.attr("keepdims")))
    return [np.asarray(y, dtype=_out_dtype(node))]


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax along ``axis``, computed in float64 (the caller rounds to its dtype)."""
    x = wide(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


@rule("softmax")
def _softmax(xs, node, ctx):
    return [softmax(xs[0], node.attr("axis")).astype(_out_dtype(node))]


# ---------------------------------------------------------------- linear algebra

@rule("matmul")
def _matmul(xs, node, ctx):
    return [wide_matmul(xs[0], xs[1]).astype(_out_dtype(node))]


@rule("linear")
def _linear(xs, node, ctx):
    y = wide_matmul(xs[0], xs[1].T)
    if len(xs) == 3:
        y += wide(xs[2])  # the bias joins the float64 sum: one rounding for the whole op
    return [y.astype(_out_dtype(node))]


@rule("embedding")
def _embedding(xs, node, ctx):
    table, ids = xs
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise InterpreterError(f"token id out of range [0, {table.shape[0]}): "
                               f"min {ids.min()}, max {ids.max()}")
    return [table[ids]]


@rule("layer_norm")
def _layer_norm(xs, node, ctx):
    x = wide(xs[0])
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + node.attr("eps"))
    if len(xs) == 3:
        y = y * wide(xs[1]) + wide(xs[2])
    return [y.astype(_out_dtype(node))]


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                     key_mask: np.ndarray | None = None) -> np.ndarray:
    """Grouped-query attention; query head h reads key/value head h // (hq // hkv).

    ``key_mask`` [b, t] (nonzero = attend) hides keys per batch row on top of the causal mask;
    a query row that sees no key gives zeros (a left-padding query row, whose output nothing
    reads). Computed in float64 and rounded once to q's dtype (see the module docstring): as the
    oracle it should carry less error than the fp32 kernels it judges.
    """
    out_dtype = q.dtype
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    b, hq, s, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    g = hq // hk
    # the g query heads of a group share one kv head: stack them along the query axis so each
    # product is one plain batched GEMM (broadcasting the kv head would leave BLAS)
    qg = q.reshape(b, hk, g * s, d) * q.dtype.type(scale)
    scores = np.matmul(qg, np.ascontiguousarray(np.swapaxes(k, -1, -2)))  # [b,hk,g*s,t]
    if causal:  # in place: the score tensor is the largest intermediate of the whole model
        allowed = np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)
        scores.reshape(b, hk, g, s, t)[...] += np.where(allowed, q.dtype.type(0), q.dtype.type(-np.inf))
    if key_mask is not None:
        hidden = np.asarray(key_mask).reshape(b, 1, 1, t) == 0
        scores[np.broadcast_to(hidden, scores.shape)] = -np.inf
    m = scores.max(axis=-1, keepdims=True)
    m[~np.isfinite(m)] = 0
    scores -= m
    np.exp(scores, out=scores)
    den = scores.sum(axis=-1, keepdims=True)
    den[den == 0] = np.inf  # no visible key: every probability 0, so the output row is 0
    scores /= den
    out = np.matmul(scores, v)  # [b,hk,g*s,dv]
    return out.reshape(b, hq, s, v.shape[-1]).astype(out_dtype)


@rule("attention")
def _attention(xs, node, ctx):
    q, k, v = xs[:3]
    mask = xs[3] if len(xs) == 4 else None
    return [causal_attention(q, k, v, node.attr("scale"), bool(node.attr("causal")), mask).astype(_out_dtype(node))]


# ---------------------------------------------------------------- data movement

@rule("reshape")
def _reshape(xs, node, ctx):
    return [xs[0].reshape(ctx.shape(node.attr("shape")))]


@rule("permute")
def _permute(xs, node, ctx):
    return [np.transpose(xs[0], node.attr("perm"))]


@rule("expand")
def _expand(xs, node, ctx):
    return [np.broadcast_to(xs[0], ctx.shape(node.attr("shape")))]


@rule("slice")
def _slice(xs, node, ctx):
    x = xs[0]
    axis = node.attr("axis")
    start, end = ctx.dim(node.attr("start")), ctx.dim(node.attr("end"))
    if not 0 <= start <= end <= x.shape[axis]:
        # symbolic bounds (e.g. "seq-3") can leave the range at a size the capture never saw
        raise InterpreterError(f"slice [{start}:{end}] out of range for axis {axis} of size "
                               f"{x.shape[axis]} ({node.attr('start')}:{node.attr('end')})")
    idx = [slice(None)] * x.ndim
    idx[axis] = slice(start, end, node.attr("step"))
    return [x[tuple(idx)]]


@rule("concat")
def _concat(xs, node, ctx):
    return [np.concatenate(xs, axis=node.attr("axis"))]


# ---------------------------------------------------------------- calls

@rule("call")
def _call(xs, node, ctx):
    # the callee binds its own symbols from the arrays it gets (a call may bind "seq" to 1)
    return run_function(ctx.module, node.attr("callee"), xs, ctx.observe, ctx.overrides, ctx.bindings)


# ---------------------------------------------------------------- driver

def bind_symbols(fn: Function, args: Sequence[np.ndarray],
                 inherited: Mapping[str, int] | None = None) -> dict[str, int]:
    """Binds the symbols in the parameter types to the actual sizes (``symbolic.bind``: plain
    symbols first, then a lone unknown in a sum such as ``past+seq``). A callee's symbols
    that its arguments leave unbound keep the caller's values (``inherited``)."""
    pairs = []
    for p, a in zip(fn.params, args):
        if a.ndim != p.type.rank:
            raise InterpreterError(f"input %{p.name}: expected rank {p.type.rank} {p.type}, got shape {a.shape}")
        for d, actual in zip(p.type.shape, a.shape):
            if isinstance(d, int) and d != actual:
                raise InterpreterError(f"input %{p.name}: expected {p.type}, got shape {a.shape}")
            pairs.append((d, actual))
    try:
        bound = sym.bind(pairs, inherited)
        return {**(inherited or {}), **{k: int(v) for k, v in bound.items()}}
    except sym.SymbolicDimError as e:
        shapes = ", ".join(f"%{p.name}: {p.type} got {a.shape}" for p, a in zip(fn.params, args))
        raise InterpreterError(f"function {fn.name!r}: {e} ({shapes})") from None


def run_function(module: Module, name: str, args: Sequence[np.ndarray],
                 observe: Callable[[Node, Sequence[np.ndarray]], None] | None = None,
                 overrides: Mapping[str, Impl] | None = None,
                 inherited: Mapping[str, int] | None = None) -> list[np.ndarray]:
    """Evaluates function ``name`` on numpy arrays and returns its results.

    ``overrides`` maps op names to implementations used instead of the reference rules, so a
    backend can run its own kernels for some ops (e.g. qlinear) and the oracle for the rest.
    ``inherited``: the caller's symbol values, for a function run by a ``call``.
    """
    fn = module.function(name)
    if len(args) != len(fn.params):
        raise InterpreterError(f"function {name!r} takes {len(fn.params)} inputs "
                               f"({', '.join(p.name for p in fn.params)}), got {len(args)}")
    args = [np.asarray(a, dtype=numpy_dtype(p.type.dtype)) for p, a in zip(fn.params, args)]
    ctx = EvalContext(module, bind_symbols(fn, args, inherited), observe, overrides)
    env: dict[str, np.ndarray] = {p.name: a for p, a in zip(fn.params, args)}
    last_use: dict[str, int] = {}
    for i, n in enumerate(fn.nodes):
        for v in n.inputs:
            last_use[v] = i
    keep = set(fn.results)
    for i, node in enumerate(fn.nodes):
        impl = overrides.get(node.op) if overrides else None
        if impl is None:
            impl = RULES.get(node.op)
        if impl is None:
            raise InterpreterError(f"no interpreter rule for op {node.op!r}")
        try:
            outs = impl([env[v] for v in node.inputs], node, ctx)
        except InterpreterError as e:
            raise InterpreterError(f"{node.op} (%{node.outputs[0].name}, {node.loc}): {e}") from e
        for v, arr in zip(node.outputs, outs):
            env[v.name] = arr
        if observe is not None:
            observe(node, outs)
        for v in node.inputs:  # free intermediates early: whole-model activations add up
            if last_use.get(v) == i and v not in keep:
                env.pop(v, None)
    return [env[r] for r in fn.results]


def evaluate(module: Module, args: Sequence[np.ndarray], function: str = "main") -> list[np.ndarray]:
    return run_function(module, function, args)


def interpreted_ops() -> frozenset[str]:
    return frozenset(RULES)


def check_complete(op_names: Mapping[str, object]) -> list[str]:
    """Ops that have a definition but no interpreter rule (should be empty)."""
    return sorted(set(op_names) - set(RULES))
