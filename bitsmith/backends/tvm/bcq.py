"""``bcq_linear`` on the tvm targets: the sign planes and scales decoded inside the kernel.

The kernel reads the IR's own operands (planes u8 [bits, out, ceil(in/8)], exponents or fp16
alphas, bias), so there is no re-layout and nothing derived to store in an artifact. Blocks of
the unscheduled definition (the same structure as ``matmul_defs.qlinear_func``, so the CUDA
GEMV scheduler and the CPU generic schedule take it unchanged):

* ``decode``: ``W[n, k] = sum_i (bit_i(n, k) ? alpha : -alpha)_i`` in float32, where a pow2
  alpha is built from its exponent's bits (``(e + 127) << 23`` reinterpreted as float32: an
  exponent add, no multiply; e = -128 gives 0) and apot2 adds two such terms; with an
  ``offsets`` operand the group's ``c * alpha_last`` is added. It is injective
  and inlined into the reduction by every schedule, so no dense weight is stored;
* ``matmul``: ``acc[i, n] = sum_k f32(x[i, k]) * W[n, k]``;
* ``epilogue``: ``y = cast(acc (+ bias))``.

On tvm-llvm the hand-vectorized kernel of ``bcq_cpu`` (same params) replaces this definition
when ``group_size % 16 == 0`` (else the generic scalar schedule). Summation order differs from
the reference (float64 over a float32-rounded weight): the targets' Tolerance covers it.
"""

from __future__ import annotations

from typing import Any, Mapping

from tvm import te, tirx

from ...errors import BitsmithError
from ...ir.bcq import OP, ZERO_EXPONENT, operand_types
from ...ir.graph import Node
from .anchor_rules import finish_out, flatten_in, matmul_out, register_anchor
from .kernel import KernelDef
from .matmul_defs import ACCUM, ATTR, _epilogue

KIND = "qgemv"  # scheduled as a quantized GEMV on every tvm target


def _pow2(e):
    """float32 2**e from an int8 exponent by building its IEEE bits; 0 for the zero sentinel."""
    e32 = tirx.Cast("int32", e)
    value = tirx.reinterpret(ACCUM, tirx.shift_left(e32 + 127, 23))
    return tirx.Select(e32 == ZERO_EXPONENT, tirx.const(0.0, ACCUM), value)


def bcq_func(attrs: Mapping[str, Any], act_dtype: str):
    bits, k, n, gs = (int(attrs[a]) for a in ("bits", "in_features", "out_features", "group_size"))
    scale, has_bias, has_offset = str(attrs["scale"]), bool(attrs["bias"]), bool(attrs.get("offset", False))
    m = tirx.Var("m", "int32")
    x = te.placeholder((m, k), act_dtype, name="x")
    (_, pt), (srole, st) = operand_types(dict(attrs))[:2]
    planes = te.placeholder(tuple(int(d) for d in pt.shape), "uint8", name="planes")
    scales = te.placeholder(tuple(int(d) for d in st.shape), st.dtype, name=srole)
    offsets = te.placeholder((n, -(-k // gs)), "int8", name="offsets") if has_offset else None

    def alpha(i, r, g):
        if scale == "pow2":
            return _pow2(scales[i, r, g])
        if scale == "apot2":
            return _pow2(scales[i, r, g, 0]) + _pow2(scales[i, r, g, 1])
        return tirx.Cast(ACCUM, scales[i, r, g])

    def weight(r, kk):
        g = kk // gs
        total = None
        for i in range(bits):
            bit = (tirx.Cast("int32", planes[i, r, kk // 8]) >> (kk % 8)) & 1
            a = alpha(i, r, g)
            term = tirx.Select(bit == 1, a, -a)
            total = term if total is None else total + term
        if has_offset:
            total = total + tirx.Cast(ACCUM, offsets[r, g]) * alpha(bits - 1, r, g)
        return total

    w = te.compute((n, k), weight, name="decode")
    kk = te.reduce_axis((0, k), name="kk")
    acc = te.compute((m, n), lambda i, r: te.sum(tirx.Cast(ACCUM, x[i, kk]) * w[r, kk], axis=kk), name="matmul")
    bias = te.placeholder((n,), act_dtype, name="bias") if has_bias else None
    y = _epilogue(acc, None, bias, m, n, act_dtype)
    params = [x, planes, scales] + ([offsets] if has_offset else []) + ([bias] if has_bias else []) + [y]
    meta = {"op": OP, "bits": bits, "in_features": k, "out_features": n, "group_size": gs, "scale": scale,
            "has_bias": has_bias, "has_offset": has_offset, "act_dtype": act_dtype}
    return te.create_prim_func(params).with_attr(ATTR, meta)


def bcq_kernel(attrs: Mapping[str, Any], act_dtype: str) -> KernelDef:
    """Params: x [m, in], planes, scales, [offsets], [bias], y [m, out]."""
    if act_dtype not in ("float32", "float16"):
        raise BitsmithError(f"tvm {OP}: activation dtype {act_dtype!r} is not supported")
    name = (f"bcq_{attrs['scale']}_w{attrs['bits']}_g{attrs['group_size']}_{attrs['in_features']}x"
            f"{attrs['out_features']}{'_offset' if attrs.get('offset') else ''}{'_bias' if attrs['bias'] else ''}"
            f"_{act_dtype}")
    return KernelDef(name, bcq_func(attrs, act_dtype), KIND)


@register_anchor(OP)
def _bcq_linear(node: Node, ctx) -> None:
    if any(ctx.constant_of(v) is None for v in node.inputs[1:]):
        raise ctx.unsupported(node, "planes, scales, offsets and bias must be constants")
    kdef = bcq_kernel(node.attr_dict, ctx.types[node.inputs[0]].dtype)
    x2, lead = flatten_in(node, ctx)
    out = matmul_out(node, ctx, lead)
    ctx.call(kdef, [x2] + [ctx.slot(v) for v in node.inputs[1:]], [out])
    finish_out(node, ctx, out[0])


def is_bcq_kernel(matmul_attrs: Mapping[str, Any]) -> bool:
    return str(matmul_attrs.get("op")) == OP


def compile_bcq(attrs: Mapping[str, Any], arrays: list, *, act_dtype: str = "float32",
                target=None):
    """x [m, in] -> y [m, out] for one bcq_linear (``arrays``: its constant operands in IR order:
    planes, scales, [offsets], [bias]); a standalone convenience for benchmarks and tests."""
    from .matmul import _compile
    kdef = bcq_kernel(attrs, act_dtype)
    return _compile(kdef, list(arrays), int(attrs["out_features"]), act_dtype, target)
