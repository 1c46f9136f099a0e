"""Unscheduled TIR definitions of ``linear`` (dense) and ``qlinear`` (decode in the kernel).

Both are TE computations turned into a PrimFunc with ``te.create_prim_func``; ``m`` (rows of
x) is a ``tir.Var``. Blocks, in order:

* ``decode`` (qlinear only): ``W[n, kk]`` = grid value of code ``kk`` of row ``n`` times its
  group's scale (plus the group's float offset, for schemes that have one), float32, computed from the sliced16 codes (see ``qlinear_layout``). It is
  injective: schedulers inline it into the reduction, so no dense weight is ever stored.
* ``matmul``: ``acc[i, n] = sum_kk f32(x[i, col(n, kk)]) * W[n, kk]`` in float32, ``col`` the
  dense column of kept weight ``kk`` (``kk`` itself without N:M sparsity).
* ``outliers`` (qlinear with outliers): ``sum_j f32(x[i, cols[j]]) * corrections[j]`` over the
  CSR entries ``j`` of row ``n`` (a reduction of static extent ``outlier_width``, masked).
* ``epilogue``: ``y = cast(acc (+ outliers) (+ bias))`` to the activation dtype.

The PrimFunc carries the attribute ``bitsmith.matmul`` (the kernel's static description) so a
CPU scheduler can pick a hand-vectorized kernel of the same signature.
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx

from .qlinear_layout import LANES, QLinearLayout, chunk_fields

ACCUM = "float32"
ATTR = "bitsmith.matmul"


def matmul_attrs(func: Any) -> dict[str, Any] | None:
    """The ``bitsmith.matmul`` description of a kernel definition (None if it has none)."""
    attrs = func.attrs[ATTR] if func.attrs is not None and ATTR in func.attrs else None
    return None if attrs is None else {str(k): v for k, v in attrs.items()}


def _field(stream: te.Tensor, width: int, n, kk):
    """Field ``kk`` of row ``n`` of a sliced16 stream, as int32."""
    byte = stream[n, (kk // chunk_fields(width)) * LANES + kk % LANES]
    shift = width * ((kk // LANES) % (8 // width))
    return (tirx.Cast("int32", byte) >> shift) & ((1 << width) - 1)


def _epilogue(acc, extra, bias, m, n_out: int, act_dtype: str):
    def body(i, n):
        v = acc[i, n]
        if extra is not None:
            v = v + extra[i, n]
        if bias is not None:
            v = v + tirx.Cast(ACCUM, bias[n])
        return tirx.Cast(act_dtype, v)
    return te.compute((m, n_out), body, name="epilogue")


def linear_func(in_features: int, out_features: int, has_bias: bool, act_dtype: str, weight_dtype: str):
    m = tirx.Var("m", "int32")
    x = te.placeholder((m, in_features), act_dtype, name="x")
    w = te.placeholder((out_features, in_features), weight_dtype, name="w")
    k = te.reduce_axis((0, in_features), name="k")
    acc = te.compute((m, out_features), lambda i, n: te.sum(
        tirx.Cast(ACCUM, x[i, k]) * tirx.Cast(ACCUM, w[n, k]), axis=k), name="matmul")
    bias = te.placeholder((out_features,), act_dtype, name="bias") if has_bias else None
    y = _epilogue(acc, None, bias, m, out_features, act_dtype)
    params = [x, w] + ([bias] if has_bias else []) + [y]
    attrs: dict[str, Any] = {"op": "linear", "in_features": in_features, "out_features": out_features,
                             "has_bias": has_bias, "act_dtype": act_dtype, "weight_dtype": weight_dtype}
    return te.create_prim_func(params).with_attr(ATTR, attrs)


def qlinear_func(lay: QLinearLayout, operand_shapes: list[tuple[tuple[int, ...], str]], act_dtype: str):
    """``operand_shapes``: (shape, dtype) of each kernel operand, in ``lay.roles()`` order."""
    m = tirx.Var("m", "int32")
    x = te.placeholder((m, lay.in_features), act_dtype, name="x")
    ph = {role: te.placeholder(shape, dtype, name=role)
          for role, (shape, dtype) in zip(lay.roles(), operand_shapes)}

    def weight(n, kk):
        code = None
        for i, (width, shift) in enumerate(lay.code_streams):
            f = _field(ph[f"codes{i}"], width, n, kk)
            code = f if code is None else code | (f << shift)
        g = kk // lay.group_size
        if lay.asymmetric:
            value = tirx.Cast(ACCUM, code) - tirx.Cast(ACCUM, ph["zeros"][n, g])
        elif lay.affine:
            value = tirx.Cast(ACCUM, code + lay.grid_low)
        else:
            sel = tirx.Cast("int32", ph["selectors"][n, g]) if lay.has_selectors else 0
            value = tirx.Cast(ACCUM, ph["grid"][sel, code])
        scaled = value * tirx.Cast(ACCUM, ph["scales"][n, g])
        return scaled + tirx.Cast(ACCUM, ph["offsets"][n, g]) if lay.offsets else scaled

    w = te.compute((lay.out_features, lay.kept), weight, name="decode")

    def column(n, kk):
        if lay.nm is None:
            return kk
        keep, block = lay.nm
        return (kk // keep) * block + _field(ph["nm_index"], lay.nm_width, n, kk)

    kk = te.reduce_axis((0, lay.kept), name="kk")
    acc = te.compute((m, lay.out_features), lambda i, n: te.sum(
        tirx.Cast(ACCUM, x[i, column(n, kk)]) * w[n, kk], axis=kk), name="matmul")
    extra = None
    if lay.outlier_width:
        e = te.reduce_axis((0, lay.outlier_width), name="e")
        cols, corr, ptr = ph["outlier_cols"], ph["outlier_corrections"], ph["outlier_rowptr"]
        last = cols.shape[0] - 1

        def outlier_sum(i, n):  # entries rowptr[n] + e of row n; e past the row's count adds 0
            j = tirx.min(ptr[n] + e, last)
            live = ptr[n] + e < ptr[n + 1]
            return te.sum(tirx.Select(live, tirx.Cast(ACCUM, x[i, cols[j]]) * corr[j], tirx.const(0, ACCUM)),
                          axis=e)

        extra = te.compute((m, lay.out_features), outlier_sum, name="outliers")
    y = _epilogue(acc, extra, ph.get("bias"), m, lay.out_features, act_dtype)
    params = [x] + [ph[r] for r in lay.roles()] + [y]
    attrs = dict(lay.as_attrs(), op="qlinear", act_dtype=act_dtype)
    return te.create_prim_func(params).with_attr(ATTR, attrs)
