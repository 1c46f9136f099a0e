"""Reductions, normalizations and contractions as ``linalg.generic`` ops on tensors.

Every sum accumulates in the op's own dtype (float32 for float32 models) in loop order; the
reference interpreter sums in float64 and rounds once, so results differ by the fp32
accumulation error (bounded in tests/test_mlir.py). softmax and layer_norm are written out
from their definitions: max-shifted exponentials over their sum, and (x - mean) / sqrt(var +
eps) with the biased variance, as the interpreter computes them.
"""

from __future__ import annotations

from typing import Callable

from ..ir import symbolic as sym
from ..ir.graph import Node
from ..ir.types import TensorType
from .elementwise import refuse_uint8
from .emitter import Body, FunctionEmitter, affine_map, identity_map, unsupported
from .registry import emits
from .types import element_literal, element_type, is_float, tensor_type

_INT_LIMITS = {"i64": 63, "i32": 31, "i8": 7}


def _init_value(kind: str, elem: str) -> float | int | bool:
    if kind == "sum":
        return False if elem == "i1" else 0
    high = kind == "min"  # min starts from the largest value, max from the smallest
    if elem.startswith("f"):
        return float("inf") if high else float("-inf")
    if elem == "i1":
        return high
    bits = _INT_LIMITS[elem]
    return (1 << bits) - 1 if high else -(1 << bits)


def _combine(b: Body, kind: str, x: str, acc: str, elem: str) -> str:
    if elem.startswith("f"):
        op = {"sum": "arith.addf", "max": "arith.maximumf", "min": "arith.minimumf"}[kind]
    elif elem == "i1":
        op = {"sum": "arith.ori", "max": "arith.ori", "min": "arith.andi"}[kind]
    else:
        op = {"sum": "arith.addi", "max": "arith.maxsi", "min": "arith.minsi"}[kind]
    return b.op(f"{op} {x}, {acc} : {elem}")


def reduce(em: FunctionEmitter, x: str, t: TensorType, axes: set[int], keepdims: bool, kind: str,
           pre: Callable[[Body, str], str] | None = None) -> tuple[str, TensorType]:
    """Reduces ``axes`` of ``x`` with ``kind`` (sum/max/min), ``pre`` applied to each element."""
    out = TensorType(tuple(1 if i in axes else d for i, d in enumerate(t.shape) if keepdims or i not in axes), t.dtype)
    elem = element_type(t.dtype)
    dest = em.filled(out, _init_value(kind, elem))
    out_map = affine_map(t.rank, [("0" if i in axes else f"d{i}") for i in range(t.rank) if keepdims or i not in axes])
    iters = ["reduction" if i in axes else "parallel" for i in range(t.rank)]

    def body(b: Body, a: list[str]) -> str:
        v = pre(b, a[0]) if pre else a[0]
        return _combine(b, kind, v, a[1], elem)

    return em.generic([(x, t, identity_map(t.rank))], out, out_map, iters, body, init=dest), out


def element_count(em: FunctionEmitter, dims: list, elem: str) -> str:
    """The product of ``dims`` as a float SSA value of type ``elem``."""
    n = sym.product(tuple(dims))
    if isinstance(n, int):
        return em.emit(f"arith.constant {element_literal(float(n), elem)} : {elem}")
    i64 = em.emit(f"arith.index_cast {em.index(n)} : index to i64")
    return em.emit(f"arith.sitofp {i64} : i64 to {elem}")


@emits("sum", "mean", "max", "min")
def _reduction(em: FunctionEmitter, node: Node) -> str:
    refuse_uint8(em, node)
    t = em.type_of(node.inputs[0])
    axes = {a % t.rank for a in node.attr("axes")}
    kind = "sum" if node.op == "mean" else node.op
    y, yt = reduce(em, em.ssa(node.inputs[0]), t, axes, bool(node.attr("keepdims")), kind)
    if node.op != "mean":
        return y
    elem = element_type(t.dtype)
    n = element_count(em, [t.shape[a] for a in sorted(axes)], elem)
    return em.map_values([(y, yt)], yt, lambda b, a: b.op(f"arith.divf {a[0]}, {n} : {elem}"))


def softmax(em: FunctionEmitter, x: str, t: TensorType, axis: int, empty_rows_zero: bool = False) -> str:
    """exp(x - max) / sum, with a non-finite max replaced by 0 as the interpreter does; with
    ``empty_rows_zero`` a row whose every entry is -inf gives zeros (masked attention)."""
    elem = element_type(t.dtype)
    m, mt = reduce(em, x, t, {axis}, True, "max")

    def shifted_exp(b: Body, a: list[str]) -> str:
        finite = b.op(f"arith.cmpf one, {b.op(f'math.absf {a[1]} : {elem}')}, {b.const(float('inf'), elem)} : {elem}")
        shift = b.op(f"arith.select {finite}, {a[1]}, {b.const(0.0, elem)} : {elem}")
        return b.op(f"math.exp {b.op(f'arith.subf {a[0]}, {shift} : {elem}')} : {elem}")

    e = em.map_values([(x, t), (m, mt)], t, shifted_exp)
    s, st = reduce(em, e, t, {axis}, True, "sum")

    def divide(b: Body, a: list[str]) -> str:
        ratio = b.op(f"arith.divf {a[0]}, {a[1]} : {elem}")
        if not empty_rows_zero:
            return ratio
        empty = b.op(f"arith.cmpf oeq, {a[1]}, {b.const(0.0, elem)} : {elem}")
        return b.op(f"arith.select {empty}, {b.const(0.0, elem)}, {ratio} : {elem}")
    return em.map_values([(e, t), (s, st)], t, divide)


@emits("softmax")
def _softmax(em: FunctionEmitter, node: Node) -> str:
    t = em.type_of(node.inputs[0])
    return softmax(em, em.ssa(node.inputs[0]), t, node.attr("axis") % t.rank)


@emits("layer_norm")
def _layer_norm(em: FunctionEmitter, node: Node) -> str:
    t = em.type_of(node.inputs[0])
    elem, last = element_type(t.dtype), t.rank - 1
    x = em.ssa(node.inputs[0])
    n = element_count(em, [t.shape[last]], elem)
    s1, st = reduce(em, x, t, {last}, True, "sum")
    d = em.map_values([(x, t), (s1, st)], t,
                      lambda b, a: b.op(f"arith.subf {a[0]}, {b.op(f'arith.divf {a[1]}, {n} : {elem}')} : {elem}"))
    sq, _ = reduce(em, d, t, {last}, True, "sum", pre=lambda b, v: b.op(f"arith.mulf {v}, {v} : {elem}"))
    eps = node.attr("eps")
    affine = [(em.ssa(v), em.type_of(v)) for v in node.inputs[1:]]

    def normalize(b: Body, a: list[str]) -> str:
        var = b.op(f"arith.divf {a[1]}, {n} : {elem}")
        std = b.op(f"math.sqrt {b.op(f'arith.addf {var}, {b.const(eps, elem)} : {elem}')} : {elem}")
        y = b.op(f"arith.divf {a[0]}, {std} : {elem}")
        if affine:
            y = b.op(f"arith.addf {b.op(f'arith.mulf {y}, {a[2]} : {elem}')}, {a[3]} : {elem}")
        return y

    return em.map_values([(d, t), (sq, st)] + affine, t, normalize)


def _multiply_add(elem: str) -> Callable[[Body, list[str]], str]:
    mul, add = ("arith.mulf", "arith.addf") if elem.startswith("f") else ("arith.muli", "arith.addi")
    return lambda b, a: b.op(f"{add} {a[2]}, {b.op(f'{mul} {a[0]}, {a[1]} : {elem}')} : {elem}")


def _batch_results(src: tuple, out_batch: tuple) -> list[str]:
    """Map results for ``src``'s batch dims broadcast (aligned right) over ``out_batch``."""
    lead = len(out_batch) - len(src)
    return ["0" if d == 1 and out_batch[lead + j] != 1 else f"d{lead + j}" for j, d in enumerate(src)]


def _named_contraction(em: FunctionEmitter, name: str, ins: list[tuple[str, TensorType]], out: TensorType,
                       init: str, maps: str = "") -> str:
    types = ", ".join(tensor_type(t) for _, t in ins)
    return em.emit(f"linalg.{name} {maps}ins({', '.join(s for s, _ in ins)} : {types}) "
                   f"outs({init} : {tensor_type(out)}) -> {tensor_type(out)}")


@emits("matmul")
def _matmul(em: FunctionEmitter, node: Node) -> str:
    """linalg.matmul / batch_matmul when the operands fit them, else a contraction generic
    (broadcast batch dims, rank > 3)."""
    a, b = (em.type_of(v) for v in node.inputs)
    out = node.output.type
    zero = em.filled(out, 0)
    ins = [(em.ssa(node.inputs[0]), a), (em.ssa(node.inputs[1]), b)]
    if a.rank == b.rank == 2:
        return _named_contraction(em, "matmul", ins, out, zero)
    if a.rank == b.rank == 3 and sym.dims_equal(a.shape[0], b.shape[0]):
        return _named_contraction(em, "batch_matmul", ins, out, zero)
    nb = out.rank - 2
    loops = out.rank + 1  # batch..., m, n, k
    m, n, k = f"d{nb}", f"d{nb + 1}", f"d{nb + 2}"
    a_map = affine_map(loops, _batch_results(a.shape[:-2], out.shape[:-2]) + [m, k])
    b_map = affine_map(loops, _batch_results(b.shape[:-2], out.shape[:-2]) + [k, n])
    o_map = affine_map(loops, [f"d{i}" for i in range(nb)] + [m, n])
    return em.generic([(ins[0][0], a, a_map), (ins[1][0], b, b_map)], out, o_map,
                      ["parallel"] * (nb + 2) + ["reduction"], _multiply_add(element_type(out.dtype)), init=zero)


@emits("linear")
def _linear(em: FunctionEmitter, node: Node) -> str:
    """x @ w.T: linalg.matmul with a transposed-B indexing map for 2-D x, else a contraction
    generic over x's leading dims; the bias is the accumulator's initial value."""
    x, w = em.type_of(node.inputs[0]), em.type_of(node.inputs[1])
    out = node.output.type
    if len(node.inputs) == 3:
        init = em.map_values([(em.ssa(node.inputs[2]), em.type_of(node.inputs[2]))], out, lambda b, a: a[0])
    else:
        init = em.filled(out, 0)
    ins = [(em.ssa(node.inputs[0]), x), (em.ssa(node.inputs[1]), w)]
    if x.rank == 2:
        maps = [affine_map(3, r) for r in (["d0", "d2"], ["d1", "d2"], ["d0", "d1"])]
        return _named_contraction(em, "matmul", ins, out, init, f"indexing_maps = [{', '.join(maps)}] ")
    nb = x.rank - 1
    loops = nb + 2  # batch..., n, k
    batch = [f"d{i}" for i in range(nb)]
    x_map = affine_map(loops, batch + [f"d{nb + 1}"])
    w_map = affine_map(loops, [f"d{nb}", f"d{nb + 1}"])
    o_map = affine_map(loops, batch + [f"d{nb}"])
    return em.generic([(ins[0][0], x, x_map), (ins[1][0], w, w_map)], out, o_map,
                      ["parallel"] * (nb + 1) + ["reduction"], _multiply_add(element_type(out.dtype)), init=init)


@emits("embedding")
def _embedding(em: FunctionEmitter, node: Node) -> str:
    table, ids = node.inputs
    tt, it = em.type_of(table), em.type_of(ids)
    out = node.output.type
    table_ssa = em.ssa(table)
    ids_elem = element_type(it.dtype)

    def gather(b: Body, a: list[str]) -> str:
        row = b.op(f"arith.index_cast {a[0]} : {ids_elem} to index")
        return b.op(f"tensor.extract {table_ssa}[{row}, {b.index(out.rank - 1)}] : {tensor_type(tt)}")

    ins = [(em.ssa(ids), it, affine_map(out.rank, [f"d{i}" for i in range(it.rank)]))]
    return em.generic(ins, out, identity_map(out.rank), ["parallel"] * out.rank, gather)


def _key_mask(em: FunctionEmitter, scores: str, scores_t: TensorType, mask_name: str) -> str:
    """scores [b, h, s, t] with -inf where mask [b, t] is zero (False)."""
    mask_t = em.type_of(mask_name)
    elem, melem = element_type(scores_t.dtype), element_type(mask_t.dtype)

    def hide(b: Body, a: list[str]) -> str:
        keep = a[1] if mask_t.dtype == "bool" else b.op(f"arith.cmpi ne, {a[1]}, {b.const(0, melem)} : {melem}")
        return b.op(f"arith.select {keep}, {a[0]}, {b.const(float('-inf'), elem)} : {elem}")

    return em.generic([(scores, scores_t, identity_map(4)), (em.ssa(mask_name), mask_t, affine_map(4, ["d0", "d3"]))],
                      scores_t, identity_map(4), ["parallel"] * 4, hide)


def attention_linalg(em: FunctionEmitter, node: Node) -> str:
    """softmax(q k^T * scale [+ bottom-right causal mask] [+ key mask]) v, grouped-query heads
    via floordiv; with a key mask, a query row that sees no key gives zeros."""
    q, k, v = (em.type_of(x) for x in node.inputs[:3])
    hq, hk = q.shape[1], k.shape[1]
    if not (isinstance(hq, int) and isinstance(hk, int)) or not is_float(q.dtype):
        raise unsupported(node, "the linalg form of attention needs static head counts and floats")
    g = hq // hk
    head = f"d1 floordiv {g}" if g > 1 else "d1"
    elem = element_type(q.dtype)
    scores_t = TensorType(q.shape[:3] + (k.shape[2],), q.dtype)
    scale = node.attr("scale")

    def scaled_product(b: Body, a: list[str]) -> str:
        qs = b.op(f"arith.mulf {a[0]}, {b.const(scale, elem)} : {elem}")
        return b.op(f"arith.addf {a[2]}, {b.op(f'arith.mulf {qs}, {a[1]} : {elem}')} : {elem}")

    scores = em.generic(
        [(em.ssa(node.inputs[0]), q, affine_map(5, ["d0", "d1", "d2", "d4"])),
         (em.ssa(node.inputs[1]), k, affine_map(5, ["d0", head, "d3", "d4"]))],
        scores_t, affine_map(5, ["d0", "d1", "d2", "d3"]), ["parallel"] * 4 + ["reduction"], scaled_product,
        init=em.filled(scores_t, 0.0))
    if node.attr("causal"):
        offset = em.index(sym.sub(k.shape[2], q.shape[2]))

        def mask(b: Body, a: list[str]) -> str:
            limit = b.op(f"arith.addi {b.index(2)}, {offset} : index")
            allowed = b.op(f"arith.cmpi sle, {b.index(3)}, {limit} : index")
            return b.op(f"arith.select {allowed}, {a[0]}, {b.const(float('-inf'), elem)} : {elem}")

        scores = em.map_values([(scores, scores_t)], scores_t, mask)
    keyed = len(node.inputs) == 4
    if keyed:
        scores = _key_mask(em, scores, scores_t, node.inputs[3])
    probs = softmax(em, scores, scores_t, 3, empty_rows_zero=keyed)
    out = node.output.type
    return em.generic(
        [(probs, scores_t, affine_map(5, ["d0", "d1", "d2", "d4"])),
         (em.ssa(node.inputs[2]), v, affine_map(5, ["d0", head, "d4", "d3"]))],
        out, affine_map(5, ["d0", "d1", "d2", "d3"]), ["parallel"] * 4 + ["reduction"], _multiply_add(elem),
        init=em.filled(out, 0.0))
