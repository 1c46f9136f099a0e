"""Hand-vectorized llvm (CPU) kernel of ``bcq_linear``: sign planes decoded 16 weights at a time
in registers, shift-and-add per plane, one scale per plane and group.

Per output row and group, each plane ``i`` keeps a float32x16 partial sum of ``+-x`` (the 16
activations with their sign flipped where the plane's bit is 0: a select, no multiply); after
the group the partial sums are scaled by the plane's alpha (a power of two built from the
exponent's bits, see ``bcq.py``) and added to the row's accumulator: ``bits`` multiplies per
group instead of one per weight. With offsets, one more float32x16 partial sum holds the plain
sum of the group's activations, scaled once per group by ``c * alpha_last``. The 16 bits of a chunk are two bytes of the IR's own planes
(LSB first), read as one int32 word, broadcast and shifted by the lane index; a cleared bit
flips the activation's float sign bit (xor). Activation rows are walked one at a time (decode re-done per row: prefill
is slower than the integer-code kernels; decode, m = 1, is the case this serves). Needs
``group_size % 16 == 0``; a short last group's whole chunks take the same path, the last
``in % 16`` weights are scalar. Parallel over tasks of ``ROWS`` output rows, one scratch slab
per parallel item (TVM 0.27 allocates locals from a workspace, see matmul_cpu_kernels).
"""

from __future__ import annotations

from typing import Any, Mapping

from tvm import tirx
from tvm.script import tirx as T

from ...ir.bcq import ZERO_EXPONENT
from .matmul_cpu_kernels import F32, V, VF32, hsum, scratch_layout

ROWS = 8  # output rows per parallel task


def _alpha(S, scale: str, i, r, g):
    def pow2(e):
        e32 = tirx.Cast("int32", e)
        return tirx.Select(e32 == ZERO_EXPONENT, tirx.const(0.0, F32),
                           tirx.reinterpret(F32, tirx.shift_left(e32 + 127, 23)))
    if scale == "pow2":
        return pow2(S[i, r, g])
    if scale == "apot2":
        return pow2(S[i, r, g, 0]) + pow2(S[i, r, g, 1])
    return tirx.Cast(F32, S[i, r, g])


def _negate_where_clear(xv, P, i, r, c):
    """``xv`` (float32x16, weights 16c .. 16c+15) with lane j's sign flipped where bit j of the
    plane is 0 (s = -1): the chunk's two bytes as one int32 word, broadcast, shifted right by the
    lane index, and the inverted low bit moved to the float sign bit (an xor, no multiply)."""
    word = tirx.bitwise_or(tirx.Cast("int32", P[i, r, c * 2]),
                           tirx.shift_left(tirx.Cast("int32", P[i, r, c * 2 + 1]), 8))
    bit = tirx.bitwise_and(tirx.shift_right(tirx.Broadcast(word, V), tirx.Ramp(0, 1, V)),
                           tirx.Broadcast(tirx.const(1, "int32"), V))
    flip = tirx.shift_left(tirx.bitwise_xor(bit, tirx.Broadcast(tirx.const(1, "int32"), V)),
                           tirx.Broadcast(tirx.const(31, "int32"), V))
    return tirx.reinterpret(VF32, tirx.bitwise_xor(tirx.reinterpret(f"int32x{V}", xv), flip))


def _bit_scalar(P, i, r, kk):
    return tirx.bitwise_and(tirx.shift_right(P[i, r, tirx.floordiv(kk, 8)], tirx.Cast("uint8", tirx.floormod(kk, 8))),
                            tirx.const(1, "uint8"))


def applies(attrs: Mapping[str, Any]) -> bool:
    return int(attrs["group_size"]) % V == 0


def bcq_kernel(attrs: Mapping[str, Any], shapes: list[tuple[tuple[int, ...], str]]):
    """PrimFunc main(x [m, k], planes, scales, [offsets], [bias], y [m, n]) with ``bcq.bcq_func``'s params."""
    bits, k, n, gs = (int(attrs[a]) for a in ("bits", "in_features", "out_features", "group_size"))
    scale, has_bias, act = str(attrs["scale"]), bool(attrs["has_bias"]), str(attrs["act_dtype"])
    has_offset = bool(attrs.get("has_offset", False))
    groups = -(-k // gs)
    sums = bits + 1  # partial-sum slot of the plain activation sum (offsets only)
    if gs % V:
        raise ValueError(f"the vector bcq kernel needs group_size % {V} == 0, got {gs}")
    (pshape, _), (sshape, sdtype) = shapes[0], shapes[1]
    cg = gs // V
    gfull = k // gs
    tail = k - gfull * gs
    tail_chunks, tail_scalar = tail // V, tail % V
    tasks = -(-n // ROWS)
    # per slab: the row accumulator (16), one partial sum per plane (bits * 16) and the plain sum
    slabs, per_task, per_slab = scratch_layout(tasks, (2 + bits) * V)

    @T.macro
    def plane_sums(X, P, part, i0, r, c0, chunks):
        for c in range(chunks):
            xv = T.bind(T.Cast(VF32, X[i0, T.Ramp((c0 + c) * V, 1, V)]))
            for p in T.unroll(bits):
                part[T.Ramp((p + 1) * V, 1, V)] = part[T.Ramp((p + 1) * V, 1, V)] + _negate_where_clear(
                    xv, P, p, r, c0 + c)
            if has_offset:
                part[T.Ramp(sums * V, 1, V)] = part[T.Ramp(sums * V, 1, V)] + xv

    @T.macro
    def flush(S, O, part, r, g):
        for p in T.unroll(bits):
            part[T.Ramp(0, 1, V)] = part[T.Ramp(0, 1, V)] + part[T.Ramp((p + 1) * V, 1, V)] * T.Broadcast(
                _alpha(S, scale, p, r, g), V)
            part[T.Ramp((p + 1) * V, 1, V)] = T.Broadcast(T.float32(0), V)
        if has_offset:
            part[T.Ramp(0, 1, V)] = part[T.Ramp(0, 1, V)] + part[T.Ramp(sums * V, 1, V)] * T.Broadcast(
                T.Cast(F32, O[r, g]) * _alpha(S, scale, bits - 1, r, g), V)
            part[T.Ramp(sums * V, 1, V)] = T.Broadcast(T.float32(0), V)

    @T.prim_func(s_tir=True)
    def main(x: T.handle, planes: T.handle, scales: T.handle, offsets: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        P = T.match_buffer(planes, pshape, "uint8")
        S = T.match_buffer(scales, sshape, sdtype)
        O = T.match_buffer(offsets, (n, groups), "int8")
        B = T.match_buffer(bias, (n,), act)
        Y = T.match_buffer(y, (m, n), act)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for slab in T.parallel(slabs):
            part = T.decl_buffer((per_slab,), F32, data=ws.data, elem_offset=slab * per_slab)
            for task_in_slab in range(per_task):
                task = T.bind(slab * per_task + task_in_slab)
                for i0 in range(m):
                    for rr in range(ROWS):
                        if task * ROWS + rr < n:
                            for z in T.unroll(bits + 2):
                                part[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
                            for g in range(gfull):
                                plane_sums(X, P, part, i0, task * ROWS + rr, g * cg, cg)
                                flush(S, O, part, task * ROWS + rr, g)
                            if tail_chunks > 0:
                                plane_sums(X, P, part, i0, task * ROWS + rr, gfull * cg, tail_chunks)
                                flush(S, O, part, task * ROWS + rr, gfull)
                            hsum(part, 0)
                            for j in range(tail_scalar):
                                for p in T.unroll(bits):
                                    part[0] = part[0] + T.Cast(F32, X[i0, gfull * gs + tail_chunks * V + j]) * T.Select(
                                        _bit_scalar(P, p, task * ROWS + rr, gfull * gs + tail_chunks * V + j)
                                        == T.uint8(1), _alpha(S, scale, p, task * ROWS + rr, gfull),
                                        -_alpha(S, scale, p, task * ROWS + rr, gfull))
                                if has_offset:
                                    part[0] = part[0] + T.Cast(F32, X[i0, gfull * gs + tail_chunks * V + j]) * (
                                        T.Cast(F32, O[task * ROWS + rr, gfull])
                                        * _alpha(S, scale, bits - 1, task * ROWS + rr, gfull))
                            if has_bias:
                                part[0] = part[0] + T.Cast(F32, B[task * ROWS + rr])
                            Y[i0, task * ROWS + rr] = T.Cast(act, part[0])

    keep = [0, 1, 2] + ([3] if has_offset else []) + ([4] if has_bias else []) + [5]
    return tirx.PrimFunc([main.params[i] for i in keep], main.body, main.ret_type, main.attrs)
