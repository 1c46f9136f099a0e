"""Op definitions: arity, attributes and shape/dtype inference, registered by name.

An op's meaning lives in the reference interpreter (``interpreter.py``); here each op only
says which inputs and attributes it takes and what type it produces, so the verifier can
check every node of a graph without running it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from . import symbolic as sym
from .symbolic import Dim
from .traits import (ATTENTION, CALL, COMMUTATIVE, CONTRACTION, DTYPE_FROM_ATTR, ELEMENTWISE, GATHER, LINEAR_LIKE,
                     LITERAL, NORMALIZATION, PURE, REDUCTION, SHAPE_ONLY, SOURCE, WIDENS_RANGE, check_traits)
from .types import FLOAT_DTYPES, INT_DTYPES, DTYPES, IRTypeError, TensorType

Attrs = Mapping[str, object]
InferFn = Callable[[tuple[TensorType, ...], Attrs], tuple[TensorType, ...]]


@dataclass(frozen=True)
class OpDef:
    name: str
    min_inputs: int
    max_inputs: int
    infer: InferFn | None  # None: the node's declared output type is checked elsewhere
    required_attrs: frozenset[str] = frozenset()
    optional_attrs: frozenset[str] = frozenset()
    doc: str = ""
    traits: frozenset[str] = frozenset()  # see traits.py
    dim_attrs: frozenset[str] = frozenset()  # attributes holding dims (or tuples of them)


OPS: dict[str, OpDef] = {}


def register_op(name: str, inputs: int | tuple[int, int], *, attrs: tuple[str, ...] = (),
                optional: tuple[str, ...] = (), doc: str = "",
                traits: tuple[str, ...] = (PURE,),
                dim_attrs: tuple[str, ...] = ()) -> Callable[[InferFn | None], InferFn | None]:
    """Registers an op; ``infer`` may be None when the verifier checks the declared output type
    itself (``constant`` against the tensor table, ``call`` against its callee). ``dim_attrs``
    names the attributes that hold (possibly symbolic) dims, which inlining a call rewrites."""
    lo, hi = (inputs, inputs) if isinstance(inputs, int) else inputs

    def deco(fn: InferFn | None) -> InferFn | None:
        if name in OPS:
            raise ValueError(f"op {name!r} registered twice")
        OPS[name] = OpDef(name, lo, hi, fn, frozenset(attrs), frozenset(optional), doc,
                          check_traits(name, frozenset(traits)), frozenset(dim_attrs))
        return fn

    return deco


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise IRTypeError(f"unknown op {name!r}") from None


# ---------------------------------------------------------------- helpers

def broadcast_shapes(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == 1:
            out.append(db)
        elif db == 1 or sym.dims_equal(da, db):
            out.append(da)
        else:
            raise IRTypeError(f"shapes {a} and {b} do not broadcast (dim {-i}: {da} vs {db})")
    return tuple(reversed(out))


def _same_dtype(types: tuple[TensorType, ...], op: str) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise IRTypeError(f"{op}: operands have different dtypes {sorted(dtypes)}")
    return dtypes.pop()


def _axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:  # a rank-0 tensor has no axis to reduce, slice or concat along
        raise IRTypeError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _require_float(t: TensorType, op: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise IRTypeError(f"{op}: needs a floating-point operand, got {t.dtype}")


# ---------------------------------------------------------------- sources

# A constant's type is declared on the node and checked against the tensor table by the verifier.
register_op("constant", 0, attrs=("name",), doc="A tensor from the module's tensor table.",
            traits=(PURE, SOURCE, LITERAL))(None)


@register_op("scalar", 0, attrs=("value", "dtype"), doc="A rank-0 tensor holding one literal.",
             traits=(PURE, SOURCE, DTYPE_FROM_ATTR, LITERAL))
def _infer_scalar(types, attrs):
    if attrs["dtype"] not in DTYPES:
        raise IRTypeError(f"scalar: unknown dtype {attrs['dtype']!r}")
    if not isinstance(attrs["value"], (bool, int, float)):
        raise IRTypeError(f"scalar: value must be a number, got {attrs['value']!r}")
    return (TensorType((), attrs["dtype"]),)


@register_op("arange", 0, attrs=("start", "end", "step", "dtype"),
             doc="Integers start, start+step, ... below end; end may be symbolic when step is 1.",
             traits=(PURE, SOURCE, DTYPE_FROM_ATTR), dim_attrs=("start", "end"))
def _infer_arange(types, attrs):
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if step == 1:
        length = sym.sub(end, start)
    elif isinstance(end, int) and isinstance(start, int) and step != 0:
        length = max(0, -(-(end - start) // step))
    else:
        raise IRTypeError("arange: a symbolic end needs step 1")
    return (TensorType((length,), attrs["dtype"]),)


# ---------------------------------------------------------------- elementwise

UNARY_FLOAT_OPS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "cos", "sin",
                   "erf", "reciprocal")
UNARY_ANY_OPS = ("neg", "abs")


def _unary(name: str, floats_only: bool) -> None:
    @register_op(name, 1, traits=(PURE, ELEMENTWISE))
    def infer(types, attrs, _name=name):
        if floats_only:
            _require_float(types[0], _name)
        return (types[0],)


for _name in UNARY_FLOAT_OPS:
    _unary(_name, True)
for _name in UNARY_ANY_OPS:
    _unary(_name, False)


@register_op("gelu", 1, attrs=("approximate",), doc="GELU; approximate is 'none' (erf) or 'tanh'.",
             traits=(PURE, ELEMENTWISE))
def _infer_gelu(types, attrs):
    _require_float(types[0], "gelu")
    if attrs["approximate"] not in ("none", "tanh"):
        raise IRTypeError(f"gelu: approximate must be 'none' or 'tanh', got {attrs['approximate']!r}")
    return (types[0],)


@register_op("logical_not", 1, traits=(PURE, ELEMENTWISE))
def _infer_logical_not(types, attrs):
    if types[0].dtype != "bool":
        raise IRTypeError("logical_not: needs a bool operand")
    return (types[0],)


BINARY_ARITH_OPS = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
COMPARE_OPS = ("eq", "ne", "lt", "le", "gt", "ge")
LOGICAL_OPS = ("logical_and", "logical_or")
_COMMUTATIVE_BINARY = frozenset({"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or"})


def _binary(name: str, result_dtype: str | None) -> None:
    traits = ((PURE, ELEMENTWISE) + ((COMMUTATIVE,) if name in _COMMUTATIVE_BINARY else ())
              + ((WIDENS_RANGE,) if name == "pow" else ()))

    @register_op(name, 2, traits=traits)
    def infer(types, attrs, _name=name):
        dtype = _same_dtype(types, _name)
        if _name in LOGICAL_OPS and dtype != "bool":
            raise IRTypeError(f"{_name}: needs bool operands")
        if _name == "div" and dtype not in FLOAT_DTYPES:
            raise IRTypeError("div: needs floating-point operands (true division)")
        return (TensorType(broadcast_shapes(types[0].shape, types[1].shape), result_dtype or dtype),)


for _name in BINARY_ARITH_OPS:
    _binary(_name, None)
for _name in COMPARE_OPS + LOGICAL_OPS:
    _binary(_name, "bool")


@register_op("where", 3, doc="cond ? a : b with broadcasting.", traits=(PURE, ELEMENTWISE))
def _infer_where(types, attrs):
    cond, a, b = types
    if cond.dtype != "bool":
        raise IRTypeError("where: condition must be bool")
    dtype = _same_dtype((a, b), "where")
    return (TensorType(broadcast_shapes(broadcast_shapes(cond.shape, a.shape), b.shape), dtype),)


@register_op("cast", 1, attrs=("dtype",), traits=(PURE, ELEMENTWISE, DTYPE_FROM_ATTR))
def _infer_cast(types, attrs):
    return (TensorType(types[0].shape, attrs["dtype"]),)


# ---------------------------------------------------------------- reductions

def _reduce(name: str) -> None:
    @register_op(name, 1, attrs=("axes", "keepdims"), traits=(PURE, REDUCTION))
    def infer(types, attrs, _name=name):
        (t,) = types
        axes = {_axis(a, t.rank, _name) for a in attrs["axes"]}
        if len(axes) != len(attrs["axes"]):
            raise IRTypeError(f"{_name}: axes {attrs['axes']} name an axis twice")
        if _name == "mean":
            _require_float(t, _name)
        shape = tuple(1 if i in axes else d for i, d in enumerate(t.shape)
                      if attrs["keepdims"] or i not in axes)
        return (TensorType(shape, t.dtype),)


for _name in ("sum", "mean", "max", "min"):
    _reduce(_name)


@register_op("softmax", 1, attrs=("axis",), traits=(PURE, NORMALIZATION))
def _infer_softmax(types, attrs):
    _require_float(types[0], "softmax")
    _axis(attrs["axis"], types[0].rank, "softmax")
    return (types[0],)


# ---------------------------------------------------------------- linear algebra

@register_op("matmul", 2, doc="numpy matmul of rank>=2 operands, batch dims broadcast.",
             traits=(PURE, CONTRACTION))
def _infer_matmul(types, attrs):
    a, b = types
    dtype = _same_dtype(types, "matmul")
    if a.rank < 2 or b.rank < 2:
        raise IRTypeError(f"matmul: operands need rank >= 2, got {a.rank} and {b.rank}")
    if not sym.dims_equal(a.shape[-1], b.shape[-2]):
        raise IRTypeError(f"matmul: inner dims differ: {a.shape} @ {b.shape}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return (TensorType(batch + (a.shape[-2], b.shape[-1]), dtype),)


@register_op("linear", (2, 3), optional=("sparsity", "outliers"),
             doc="x @ w.T (+ b); w is [out, in] as in torch.nn.Linear. Optional annotations for "
                 "the quantize pass: sparsity 'N:M' (w is already N:M pruned) and outliers (the "
                 "fraction of weights to keep in fp16).",
             traits=(PURE, CONTRACTION, LINEAR_LIKE))
def _infer_linear(types, attrs):
    x, w = types[0], types[1]
    dtype = _same_dtype(types, "linear")
    if w.rank != 2 or x.rank < 1:
        raise IRTypeError(f"linear: weight must be rank 2 and input rank >= 1, got {w.shape}, {x.shape}")
    if not sym.dims_equal(x.shape[-1], w.shape[1]):
        raise IRTypeError(f"linear: input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    if len(types) == 3 and (types[2].rank != 1 or not sym.dims_equal(types[2].shape[0], w.shape[0])):
        raise IRTypeError(f"linear: bias shape {types[2].shape} != ({w.shape[0]},)")
    return (TensorType(x.shape[:-1] + (w.shape[0],), dtype),)


@register_op("embedding", 2, doc="Rows of table [vocab, dim] gathered by integer ids.", traits=(PURE, GATHER))
def _infer_embedding(types, attrs):
    table, ids = types
    if table.rank != 2:
        raise IRTypeError(f"embedding: table must be rank 2, got {table.shape}")
    if ids.dtype not in INT_DTYPES:
        raise IRTypeError(f"embedding: ids must be integers, got {ids.dtype}")
    return (TensorType(ids.shape + (table.shape[1],), table.dtype),)


@register_op("layer_norm", (1, 3), attrs=("eps",), doc="LayerNorm over the last dim, optional affine.",
             traits=(PURE, NORMALIZATION))
def _infer_layer_norm(types, attrs):
    _require_float(types[0], "layer_norm")
    if len(types) == 2:
        raise IRTypeError("layer_norm: takes x, or x with weight and bias")
    for p in types[1:]:
        if p.rank != 1 or not sym.dims_equal(p.shape[0], types[0].shape[-1]):
            raise IRTypeError(f"layer_norm: parameter shape {p.shape} != ({types[0].shape[-1]},)")
    _same_dtype(types, "layer_norm")
    return (types[0],)


@register_op("attention", (3, 4), attrs=("scale", "causal"),
             doc="softmax(q k^T * scale [+ causal mask] [+ key mask]) v; q [b,hq,s,d], k/v [b,hkv,t,d]; "
                 "hq is a multiple of hkv (grouped-query); the causal mask is aligned to the "
                 "bottom right, so query i sees keys j <= i + (t - s). The optional 4th input is a "
                 "key-padding mask [b, t] (bool or integer, nonzero = attend, transformers' "
                 "attention_mask convention); a query row that sees no key gives zeros.",
             traits=(PURE, CONTRACTION, ATTENTION))
def _infer_attention(types, attrs):
    q, k, v = types[:3]
    dtype = _same_dtype(types[:3], "attention")
    _require_float(q, "attention")
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise IRTypeError("attention: q, k, v must be rank 4 [batch, heads, seq, head_dim]")
    if not sym.dims_equal(q.shape[3], k.shape[3]) or not sym.dims_equal(k.shape[2], v.shape[2]) \
            or not sym.dims_equal(k.shape[1], v.shape[1]):
        raise IRTypeError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    hq, hk = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hk, int) and (hk == 0 or hq % hk):
        raise IRTypeError(f"attention: {hq} query heads are not a multiple of {hk} key/value heads")
    if len(types) == 4:
        mask = types[3]
        if mask.dtype != "bool" and mask.dtype not in INT_DTYPES:
            raise IRTypeError(f"attention: the key mask must be bool or integer, got {mask.dtype}")
        if mask.rank != 2 or not sym.dims_equal(mask.shape[0], q.shape[0]) \
                or not sym.dims_equal(mask.shape[1], k.shape[2]):
            raise IRTypeError(f"attention: the key mask must be [batch, kv_len] = "
                              f"[{q.shape[0]}, {k.shape[2]}], got {list(mask.shape)}")
    return (TensorType(q.shape[:3] + (v.shape[3],), dtype),)


# ---------------------------------------------------------------- data movement

@register_op("reshape", 1, traits=(PURE, SHAPE_ONLY), attrs=("shape",), dim_attrs=("shape",))
def _infer_reshape(types, attrs):
    (t,) = types
    shape = tuple(attrs["shape"])
    if not sym.dims_equal(sym.product(t.shape), sym.product(shape)):
        raise IRTypeError(f"reshape: {t.shape} has a different element count than {shape}")
    return (TensorType(shape, t.dtype),)


@register_op("permute", 1, traits=(PURE, SHAPE_ONLY), attrs=("perm",))
def _infer_permute(types, attrs):
    (t,) = types
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(t.rank)):
        raise IRTypeError(f"permute: {perm} is not a permutation of {t.rank} axes")
    return (TensorType(tuple(t.shape[p] for p in perm), t.dtype),)


@register_op("expand", 1, attrs=("shape",), doc="Broadcast to a shape (numpy broadcast_to).",
             traits=(PURE, SHAPE_ONLY), dim_attrs=("shape",))
def _infer_expand(types, attrs):
    (t,) = types
    shape = tuple(attrs["shape"])
    if len(shape) < t.rank:
        raise IRTypeError(f"expand: target {shape} has lower rank than {t.shape}")
    for i in range(1, t.rank + 1):
        if t.shape[-i] != 1 and not sym.dims_equal(t.shape[-i], shape[-i]):
            raise IRTypeError(f"expand: cannot expand {t.shape} to {shape}")
    return (TensorType(shape, t.dtype),)


@register_op("slice", 1, attrs=("axis", "start", "end", "step"),
             doc="Elements start <= i < end by step along one axis; bounds are in range.",
             traits=(PURE, SHAPE_ONLY), dim_attrs=("start", "end"))
def _infer_slice(types, attrs):
    (t,) = types
    axis = _axis(attrs["axis"], t.rank, "slice")
    start, end, step = attrs["start"], attrs["end"], attrs["step"]
    if not isinstance(step, int) or step < 1:
        raise IRTypeError(f"slice: step must be a positive int, got {step!r}")
    if isinstance(start, int) and start < 0:
        raise IRTypeError(f"slice: start {start} is negative")
    if step == 1:
        length = sym.sub(end, start)
    elif isinstance(start, int) and isinstance(end, int):
        length = max(0, -(-(end - start) // step))
    else:
        raise IRTypeError("slice: symbolic bounds need step 1")
    if isinstance(length, int) and length < 0:
        raise IRTypeError(f"slice: end {end} before start {start}")
    dim = t.shape[axis]
    if isinstance(dim, int) and isinstance(end, int) and end > dim:
        raise IRTypeError(f"slice: end {end} past dim {dim}")
    shape = list(t.shape)
    shape[axis] = length
    return (TensorType(tuple(shape), t.dtype),)


@register_op("concat", (1, 1 << 16), attrs=("axis",), traits=(PURE, SHAPE_ONLY))
def _infer_concat(types, attrs):
    first = types[0]
    axis = _axis(attrs["axis"], first.rank, "concat")
    dtype = _same_dtype(types, "concat")
    total: Dim = 0
    for t in types:
        if t.rank != first.rank or any(i != axis and not sym.dims_equal(a, b)
                                       for i, (a, b) in enumerate(zip(t.shape, first.shape))):
            raise IRTypeError(f"concat: shapes {[x.shape for x in types]} differ off axis {axis}")
        total = sym.add(total, t.shape[axis])
    shape = list(first.shape)
    shape[axis] = total
    return (TensorType(tuple(shape), dtype),)


# ---------------------------------------------------------------- calls

# Inputs are the callee's parameters in order, outputs its results; the verifier checks both
# against the callee (verifier.py), so there is no inference rule here. Not declared PURE:
# a pass that wants to move or merge calls looks at the callee.
register_op("call", (0, 1 << 16), attrs=("callee",),
            doc="Calls the function named by callee (a function of the same module).",
            traits=(CALL,))(None)
