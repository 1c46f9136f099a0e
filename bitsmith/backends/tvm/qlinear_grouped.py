"""Float llvm (CPU) kernel of ``qlinear`` for GGUF blocks of 32 (Q4_0, Q4_1, Q4_K, Q8_0): per-group sums.

Why: the general float kernel (``matmul_cpu_kernels.qlinear_kernel``) dequantizes every weight
(``d c + m``: one FMA per 16 weights, with the group's fp16 scale and offset converted and
broadcast per group) before multiplying it with x, and walks one output row at a time; with
one activation row a SmolLM2 1536 x 576 Q4_1 layer from DRAM took ~60 us on one Zen 5 thread
(~9 GB/s of ~36), the exact GGUF row's largest cost (issue 15). Here, per group g of 32
weights (codes c, scale d_g, offset m_g, grid ``value = code + low``)

    sum_k (d_g (c_k + low) + m_g) x_k = d_g sum_k c_k x_k + (d_g low + m_g) xs_g,

with ``xs_g = sum_k x_k`` computed once per activation row: per 16 weights a widen, a convert
and one multiply-add; one multiply by d_g per group; the offset term one vector dot product over
groups per output row (as in ``qlinear_a8``, whose structure this kernel shares: output rows
walked in pairs so their chains overlap, rows 16 ahead prefetched; four rows at a time were as
fast for 576-weight rows and slower for 1536-weight ones, measured from DRAM on one thread). Floats all the way: the
GGUF weights meet float32 activations, no activation rounding (the ``activation_bits=8``
kernel's). Sums run in another order than the reference's, so results agree to float32
rounding (tests/test_qlinear_grouped.py); for Q4_0 (low = -8) the two terms partly cancel, which
costs a few ulps of the larger term.

Eight or more activation rows (prefill) take tiles of ``MTILE`` rows against one output row with
each group dequantized once (``d c + m``, then one FMA per row and 16 weights), as the general
kernel does.

Applies where ``applies`` says (4-bit affine grids in groups of 32: GGUF Q4_0, Q4_1, Q4_K's
sub-blocks; Q8_0; no sparsity, selectors or outliers); other layouts keep the general kernel.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .matmul_cpu_kernels import F32, PREFETCH_ROWS, V, hsum, prefetch_row, role_lookup, row_lines, scratch_layout
from .qlinear_blocks import GROUP, finish_macro, hsum16, layout_reason, with_roles
from .qlinear_layout import QLinearLayout

ROWS = 8        # output rows per parallel task
MTILE = 8       # activation rows sharing one dequantized group (prefill)
R4 = 2          # output rows walked together for one activation row
VF = f"float32x{V}"


def applies(lay: QLinearLayout) -> str | None:
    """None where the kernel covers ``lay``, else why not (reported with the schedule)."""
    return layout_reason(lay, "grouped float kernel", GROUP)


def _codes(C0, r, g, half: int, bits: int):
    """float32x16: codes (4-bit: 0..15) or int8 values (8-bit: stored + 128) of weights
    16 * half .. 16 * half + 15 of group g, row r."""
    if bits == 4:  # 16 bytes per group: low nibbles weights 0..15, high nibbles 16..31
        raw = C0[r, tirx.Ramp(g * V, 1, V)]
        nib = (tirx.bitwise_and(raw, tirx.Broadcast(tirx.const(15, "uint8"), V)) if half == 0
               else tirx.shift_right(raw, tirx.Broadcast(tirx.const(4, "uint8"), V)))
        return T.Cast(VF, nib)
    raw = C0[r, tirx.Ramp(g * GROUP + half * V, 1, V)]
    w = tirx.reinterpret(f"int8x{V}", tirx.bitwise_xor(raw, tirx.Broadcast(tirx.const(128, "uint8"), V)))
    return T.Cast(VF, w)


def qlinear_grouped_kernel(lay: QLinearLayout, shapes: list[tuple[tuple[int, ...], str]], act: str) -> tirx.PrimFunc:
    """PrimFunc with the params of ``matmul_defs.qlinear_func(lay, shapes, act)``."""
    why = applies(lay)
    if why:
        raise ValueError(why)
    roles = lay.roles()
    shp, dt = role_lookup(roles, shapes)
    k, n = lay.in_features, lay.out_features
    groups = k // GROUP
    offs, has_bias, low, bits = lay.offsets, lay.has_bias, float(lay.grid_low), lay.bits
    tasks = -(-n // ROWS)
    acc_len = max(MTILE, 2 * R4) * V
    slabs, per_task, per_slab = scratch_layout(tasks, acc_len + R4 * groups)
    gv = groups // V * V  # groups covered by 16-wide vectors in the offset term
    pf_c0, pf_s = row_lines(shp("codes0"), "uint8"), row_lines(shp("scales"), lay.scale_dtype)
    pf_o = row_lines(shp("offsets"), lay.scale_dtype) if offs else (0, 1)

    def _weights(C0, S, O, r, g, half):
        """float32x16: dequantized weights d (c + low) + m (the prefill tile's form)."""
        d = T.Broadcast(T.Cast(F32, S[r, g]), V)
        c = _codes(C0, r, g, half, bits)
        w = (c + T.Broadcast(tirx.const(low, F32), V)) * d if low and bits == 4 else c * d  # 8-bit: signed values
        return w + T.Broadcast(T.Cast(F32, O[r, g]), V) if offs else w

    @T.macro
    def group_sums(X, XS, i):
        """xs_g = sum of row i's activations over group g."""
        for g in range(groups):
            XS[i * groups + g] = hsum16(T.Cast(VF, X[i, T.Ramp(g * GROUP, 1, V)])
                                         + T.Cast(VF, X[i, T.Ramp(g * GROUP + V, 1, V)]))

    finish = finish_macro(lay, act)

    @T.macro
    def tile(X, C0, S, O, B, Y, acc, mt, m0, r):
        """Output row r against ``mt`` activation rows: each group dequantized once."""
        for z in T.unroll(mt):
            acc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for g in range(groups):
            wlo = T.bind(_weights(C0, S, O, r, g, 0))
            whi = T.bind(_weights(C0, S, O, r, g, 1))
            for mi in T.unroll(mt):
                acc[T.Ramp(mi * V, 1, V)] = (acc[T.Ramp(mi * V, 1, V)]
                                             + wlo * T.Cast(VF, X[m0 + mi, T.Ramp(g * GROUP, 1, V)])
                                             + whi * T.Cast(VF, X[m0 + mi, T.Ramp(g * GROUP + V, 1, V)]))
        for mi in T.unroll(mt):
            hsum(acc, mi * V)
            if has_bias:
                acc[mi * V] = acc[mi * V] + T.Cast(F32, B[r])
            Y[m0 + mi, r] = T.Cast(act, acc[mi * V])

    @T.macro
    def rows_together(X, XS, C0, S, O, B, Y, acc, se, i, r0, nr):
        """``nr`` (<= R4) output rows against activation row i, walked together (a 576-weight
        row is 18 groups: one row at a time leaves the core waiting on latencies)."""
        for ri in T.unroll(nr):
            prefetch_row(C0, pf_c0[0], pf_c0[1], r0 + ri + PREFETCH_ROWS, n)
            prefetch_row(S, pf_s[0], pf_s[1], r0 + ri + PREFETCH_ROWS, n)
            if offs:
                prefetch_row(O, pf_o[0], pf_o[1], r0 + ri + PREFETCH_ROWS, n)
            for gb in range(gv // V):
                se[T.Ramp(ri * groups + gb * V, 1, V)] = T.Cast(VF, S[r0 + ri, T.Ramp(gb * V, 1, V)])
            for g in range(groups - gv):
                se[ri * groups + gv + g] = T.Cast(F32, S[r0 + ri, gv + g])
            acc[T.Ramp(ri * 2 * V, 1, 2 * V)] = T.Broadcast(T.float32(0), 2 * V)
        for g in range(groups):
            xlo = T.bind(T.Cast(VF, X[i, T.Ramp(g * GROUP, 1, V)]))
            xhi = T.bind(T.Cast(VF, X[i, T.Ramp(g * GROUP + V, 1, V)]))
            for ri in T.unroll(nr):
                s = T.bind(_codes(C0, r0 + ri, g, 0, bits) * xlo + _codes(C0, r0 + ri, g, 1, bits) * xhi)
                slot = T.bind((ri * 2 + g % 2) * V)  # two accumulators per row: FMA latency
                acc[T.Ramp(slot, 1, V)] = acc[T.Ramp(slot, 1, V)] + s * T.Broadcast(se[ri * groups + g], V)
        for ri in T.unroll(nr):
            acc[T.Ramp(ri * 2 * V, 1, V)] = acc[T.Ramp(ri * 2 * V, 1, V)] + acc[T.Ramp(ri * 2 * V + V, 1, V)]
            finish(XS, S, O, B, Y, acc, ri * 2 * V, i, r0 + ri)

    @T.prim_func(s_tir=True)
    def main(x: T.handle, c0: T.handle, scales: T.handle, offsets: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        C0 = T.match_buffer(c0, shp("codes0"), "uint8")
        S = T.match_buffer(scales, shp("scales"), lay.scale_dtype)
        O = T.match_buffer(offsets, shp("offsets"), lay.scale_dtype)
        B = T.match_buffer(bias, shp("bias"), dt("bias", act))
        Y = T.match_buffer(y, (m, n), act)
        XS = T.alloc_buffer((m * groups,), F32)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for i in range(m % MTILE):
            group_sums(X, XS, m - m % MTILE + i)
        for slab in T.parallel(slabs):
            acc = T.decl_buffer((acc_len,), F32, data=ws.data, elem_offset=slab * per_slab)
            se = T.decl_buffer((R4 * groups,), F32, data=ws.data, elem_offset=slab * per_slab + acc_len)
            for task_in_slab in range(per_task):
                task = T.bind(slab * per_task + task_in_slab)
                for mo in range(m // MTILE):
                    for rr in range(ROWS):
                        if task * ROWS + rr < n:
                            tile(X, C0, S, O, B, Y, acc, MTILE, mo * MTILE, task * ROWS + rr)
                for mi in range(m % MTILE):
                    for rb in range(ROWS // R4):
                        if task * ROWS + rb * R4 + R4 <= n:
                            rows_together(X, XS, C0, S, O, B, Y, acc, se, m - m % MTILE + mi, task * ROWS + rb * R4, R4)
                        else:
                            for rr in range(R4):
                                if task * ROWS + rb * R4 + rr < n:
                                    rows_together(X, XS, C0, S, O, B, Y, acc, se, m - m % MTILE + mi,
                                          task * ROWS + rb * R4 + rr, 1)

    return with_roles(main, roles)
