"""W4A8 llvm (CPU) kernel of ``qlinear``: activations quantized to int8 per group, integer dot
products (AVX-512 VNNI ``vpdpbusd``; AVX2 ``pmaddubsw`` + ``pmaddwd``), the option
``activation_bits=8`` of tvm-llvm.

Why: the float kernel (``matmul_cpu_kernels.qlinear_kernel``) widens every 4-bit code to float32
and spends ~7 vector instructions per 16 weights; one thread then streams a GGUF Q4_1 model at
about half the memory's read bandwidth. With int8 activations 64 weights cost one 32-byte load,
a mask, a shift and two integer dot instructions, as in llama.cpp's Q4 x Q8 dot products (the
like-for-like comparison, issue 15). Accuracy cost: per group of 32 activations, x is replaced
by ``dx * round(x / dx)`` with ``dx = max|x| / 127`` (relative error <= 1/254 of the group's
largest activation per element, unbiased); on SmolLM2 perplexity 20.832 -> 20.854
(benchmarks/decode_race.py, row ``tvm-llvm/gguf-a8``). Four output rows are walked together
(independent chains: a 576-weight row is only 9 integer dots) and rows 16 ahead are prefetched
(``matmul_cpu_kernels.prefetch_row``): 1536 x 576 Q4_1 from DRAM, one thread, 42 us (float
kernel) -> 24 us.

Applies to affine 4-bit grids with groups of 32 (``value = code + low``: GGUF Q4_0, Q4_1; with
``offsets``: Q4_1's ``m``) and to GGUF Q8_0 (int8 values stored as ``code - 128``: SmolLM2's tied
lm_head), ``in_features % 64 == 0``, no sparsity, selectors or outliers (``applies``); other
layers keep the float kernel. Q8_0 weights are signed, and both dot instructions take one
unsigned operand: ``|w|`` meets ``q`` carrying w's sign (``psignb``), llama.cpp's Q8_0 x Q8_0
trick; the 8 lanes of each group's dot are folded to 4 so both widths share what follows.

Math, per activation row and group g (32 weights, codes c, activations x quantized to
``x^ = dx_g q``, ``q = round(x / dx_g)`` nearest even): the dot product with x^,
``sum_k (d_g (c_k + low) + m_g) x^_k = d_g dx_g sum_k c_k q_k + (d_g low + m_g) dx_g sum_k q_k``,
both integer sums exact (|c q| <= 15 * 127, 32 terms). Using x^ in the offset term too (as
llama.cpp's Q8_1 sums do) keeps the rounding errors multiplied by the centred weights
``d c + m`` rather than by the all-positive ``d c``: with the float sum of x there instead,
SmolLM2's perplexity rose 0.63% (20.832 -> 20.964), with x^ 0.07% (20.846; 4 windows of 512
tokens, benchmarks/decode_race.py; Q4_1 layers only, 20.854 with the Q8_0 lm_head too).

The codes' layout (``qlinear_layout``, sliced16) holds group g in 16 bytes: low nibbles weights
0..15, high nibbles 16..31; 32 bytes hold two groups, so the quantized activations are stored per pair of
groups as [low halves of both | high halves of both] (64 bytes) and one mask / one shift give
the two byte vectors that line up with them. Of the 8 int32 lanes of the dot, lanes 0-3 belong
to the pair's first group and 4-7 to the second: each lane is scaled by its group's
``d_g dx_g`` (dx expanded x4 when the activations are quantized) and summed in float32. The
``(d_g low + m_g) xs_g`` terms (``xs_g = dx_g sum_k q_k``) are one vector dot product over
groups per output row.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .matmul_cpu_kernels import F32, PREFETCH_ROWS, V, prefetch_row, role_lookup, row_lines, scratch_layout
from .qlinear_blocks import GROUP, finish_macro, hmax16, hsum16, layout_reason, with_roles
from .qlinear_layout import QLinearLayout

PAIR = 64       # weights per integer dot (two groups, 32 code bytes)
LANES8 = 8      # int32 lanes of one 32-byte dot
ROWS = 8        # output rows per parallel task
MTILE = 4       # activation rows sharing one decoded pair of groups
R4 = 4          # output rows walked together for one activation row
EXPAND4 = [a for a in range(4) for _ in range(4)]  # 4 group scales -> each over its 4 int32 lanes


def applies(lay: QLinearLayout) -> str | None:
    """None where the kernel covers ``lay``, else why not (reported with the schedule)."""
    return layout_reason(lay, "W4A8", PAIR)


_DOT = {  # lanes of the byte operands -> (vpdpbusd, pmaddubsw, pmaddwd, abs, psignb)
    64: ("llvm.x86.avx512.vpdpbusd.512", "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512", None,
         None),  # AVX-512 (BW, VNNI): no psignb at this width, so unsigned codes only (_dot_u8s8)
    32: ("llvm.x86.avx512.vpdpbusd.256", "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd", "llvm.abs.v32i8",
         "llvm.x86.avx2.psign.b"),
    16: ("llvm.x86.avx512.vpdpbusd.128", "llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd",
         "llvm.abs.v16i8", "llvm.x86.ssse3.psign.b.128"),
}


def _dot_u8s8(acc, codes, acts, vnni: bool, lanes: int = 32):
    """int32 x lanes/4: acc + sum of 4 consecutive u8 codes * s8 activations per lane."""
    dpbusd, maddubs, maddwd, _abs, _sign = _DOT[lanes]
    out = f"int32x{lanes // 4}"
    if vnni:
        return tirx.call_llvm_pure_intrin(out, dpbusd, acc, tirx.reinterpret(f"int8x{lanes}", codes), acts)
    # |code * q| <= 15 * 127, so the pairwise int16 sums of pmaddubsw never saturate
    pairs = tirx.call_llvm_pure_intrin(f"int16x{lanes // 2}", maddubs, codes, acts)
    return acc + tirx.call_llvm_pure_intrin(out, maddwd, pairs, tirx.Broadcast(tirx.const(1, "int16"), lanes // 2))


def _dot_s8s8(codes, acts, vnni: bool, lanes: int = 32):
    """int32 x lanes/4: sums of 4 consecutive int8 weights (u8 codes - 128) * s8 activations per lane.
    pmaddubsw / vpdpbusd take one unsigned operand: |w| (<= 128) meets q with w's sign, and
    |w| * |q| <= 128 * 127 keeps pmaddubsw's pairwise int16 sums from saturating."""
    _dpbusd, _maddubs, _maddwd, absb, signb = _DOT[lanes]
    w = tirx.reinterpret(f"int8x{lanes}", tirx.bitwise_xor(codes, tirx.Broadcast(tirx.const(128, "uint8"), lanes)))
    a = tirx.reinterpret(f"uint8x{lanes}", tirx.call_llvm_pure_intrin(f"int8x{lanes}", absb, w,
                                                                      tirx.const(False, "bool")))
    b = tirx.call_llvm_pure_intrin(f"int8x{lanes}", signb, acts, w)
    return _dot_u8s8(tirx.Broadcast(tirx.const(0, "int32"), lanes // 4), a, b, vnni, lanes)


def _pair_isum(C0, QA, r, qbase, p, bits: int, vnni: bool):
    """int32x8 of pair p (groups 2p, 2p + 1) of row r against activations at ``qbase``: lanes 0-3
    sum to group 2p's integer dot product, lanes 4-7 to group 2p + 1's."""
    if bits == 4:  # 32 code bytes, activations in pair layout (module doc)
        raw = C0[r, tirx.Ramp(p * (PAIR // 2), 1, PAIR // 2)]
        lo = tirx.bitwise_and(raw, tirx.Broadcast(tirx.const(15, "uint8"), PAIR // 2))
        hi = tirx.shift_right(raw, tirx.Broadcast(tirx.const(4, "uint8"), PAIR // 2))
        zero = tirx.Broadcast(tirx.const(0, "int32"), LANES8)
        return _dot_u8s8(_dot_u8s8(zero, lo, QA[tirx.Ramp(qbase + p * PAIR, 1, PAIR // 2)], vnni), hi,
                         QA[tirx.Ramp(qbase + p * PAIR + PAIR // 2, 1, PAIR // 2)], vnni)
    # 8-bit: 64 code bytes, one group per 32, activations in natural order; fold each group's 8
    # lanes to 4 so the lanes line up with the 4-bit form
    ia = _dot_s8s8(C0[r, tirx.Ramp(p * PAIR, 1, GROUP)], QA[tirx.Ramp(qbase + p * PAIR, 1, GROUP)], vnni)
    ib = _dot_s8s8(C0[r, tirx.Ramp(p * PAIR + GROUP, 1, GROUP)],
                   QA[tirx.Ramp(qbase + p * PAIR + GROUP, 1, GROUP)], vnni)
    return (tirx.Shuffle([ia, ib], [0, 1, 2, 3, 8, 9, 10, 11])
            + tirx.Shuffle([ia, ib], [4, 5, 6, 7, 12, 13, 14, 15]))


def qlinear_a8_kernel(lay: QLinearLayout, shapes: list[tuple[tuple[int, ...], str]], act: str, vnni: bool):
    """PrimFunc with the params of ``matmul_defs.qlinear_func(lay, shapes, act)``."""
    why = applies(lay)
    if why:
        raise ValueError(why)
    roles = lay.roles()
    shp, dt = role_lookup(roles, shapes)
    k, n = lay.in_features, lay.out_features
    groups, pairs = k // GROUP, k // PAIR
    offs, bits = lay.offsets, lay.bits
    tasks = -(-n // ROWS)
    slabs, per_task, per_slab = scratch_layout(tasks, max(MTILE, R4) * V + R4 * groups * 4)
    pf_c0, pf_s = row_lines(shp("codes0"), "uint8"), row_lines(shp("scales"), lay.scale_dtype)
    pf_o = row_lines(shp("offsets"), lay.scale_dtype) if offs else (0, 1)

    hi_off = GROUP if bits == 4 else V  # where a group's second 16 activations go

    def _qa_base(i, g):
        """Where group g's first 16 activations go: pair layout (4-bit), natural (8-bit)."""
        return i * k + (g // 2) * PAIR + (g % 2) * V if bits == 4 else i * k + g * GROUP

    @T.macro
    def quantize(X, QA, DXE, XS, i):
        """Row i of x: int8 activations (pair layout), dx expanded x4, group sums."""
        for g in range(groups):
            lo = T.bind(T.Cast(f"float32x{V}", X[i, T.Ramp(g * GROUP, 1, V)]))
            hi = T.bind(T.Cast(f"float32x{V}", X[i, T.Ramp(g * GROUP + V, 1, V)]))
            amax = T.bind(T.max(T.abs(lo), T.abs(hi)))
            top = T.bind(hmax16(amax))
            inv = T.bind(T.Select(top > T.float32(0), T.float32(127) / top, T.float32(0)))
            dx = T.bind(top / T.float32(127))
            base = T.bind(_qa_base(i, g))
            qlo = T.bind(T.nearbyint(lo * T.Broadcast(inv, V)))  # integers, exact in float32
            qhi = T.bind(T.nearbyint(hi * T.Broadcast(inv, V)))
            QA[T.Ramp(base, 1, V)] = T.Cast(f"int8x{V}", T.Cast(f"int32x{V}", qlo))
            QA[T.Ramp(base + hi_off, 1, V)] = T.Cast(f"int8x{V}", T.Cast(f"int32x{V}", qhi))
            DXE[T.Ramp(i * groups * 4 + g * 4, 1, 4)] = T.Broadcast(dx, 4)
            XS[i * groups + g] = dx * hsum16(qlo + qhi)  # |sum| <= 32 * 127: exact before the scaling

    @T.macro
    def expand_scales(S, se, base, r):
        """Row r's scales at se[base:], each repeated over its group's 4 int32 lanes (once per row, 4
        groups per shuffle), so the pair loop reads lane scales with one load."""
        for gb in range(groups // 4):
            se[T.Ramp(base + gb * V, 1, V)] = T.Shuffle([T.Cast("float32x4", S[r, T.Ramp(gb * 4, 1, 4)])] * 4, EXPAND4)
        for g in range(groups % 4):
            se[T.Ramp(base + (groups // 4 * 4 + g) * 4, 1, 4)] = T.Broadcast(T.Cast(F32, S[r, groups // 4 * 4 + g]), 4)

    finish = finish_macro(lay, act)

    @T.macro
    def rows_tile(QA, DXE, XS, C0, S, O, B, Y, acc, se, mt, m0, r):
        """One output row against ``mt`` activation rows (each pair of groups decoded once)."""
        expand_scales(S, se, 0, r)
        for z in T.unroll(mt):
            acc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for p in range(pairs):
            for mi in T.unroll(mt):
                isum = T.bind(_pair_isum(C0, QA, r, (m0 + mi) * k, p, bits, vnni))
                slot = T.bind(mi * V + (p % 2) * LANES8)  # two accumulators per row: FMA latency
                acc[T.Ramp(slot, 1, LANES8)] = acc[T.Ramp(slot, 1, LANES8)] + T.Cast("float32x8", isum) * (
                    se[T.Ramp(p * LANES8, 1, LANES8)] * DXE[T.Ramp((m0 + mi) * groups * 4 + p * LANES8, 1, LANES8)])
        for mi in T.unroll(mt):
            finish(XS, S, O, B, Y, acc, mi * V, m0 + mi, r)

    @T.macro
    def rows4_one_x(QA, DXE, XS, C0, S, O, B, Y, acc, se, i, r0):
        """Four output rows against one activation row: independent chains overlap (a row of
        576 weights is only 9 pairs; one row at a time leaves the core waiting on latencies)."""
        for ri in T.unroll(R4):
            prefetch_row(C0, pf_c0[0], pf_c0[1], r0 + ri + PREFETCH_ROWS, n)
            prefetch_row(S, pf_s[0], pf_s[1], r0 + ri + PREFETCH_ROWS, n)
            if offs:
                prefetch_row(O, pf_o[0], pf_o[1], r0 + ri + PREFETCH_ROWS, n)
            expand_scales(S, se, ri * groups * 4, r0 + ri)
            acc[T.Ramp(ri * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for p in range(pairs):
            dxe = T.bind(DXE[T.Ramp(i * groups * 4 + p * LANES8, 1, LANES8)])
            for ri in T.unroll(R4):
                isum = T.bind(_pair_isum(C0, QA, r0 + ri, i * k, p, bits, vnni))
                slot = T.bind(ri * V + (p % 2) * LANES8)
                acc[T.Ramp(slot, 1, LANES8)] = acc[T.Ramp(slot, 1, LANES8)] + T.Cast("float32x8", isum) * (
                    se[T.Ramp(ri * groups * 4 + p * LANES8, 1, LANES8)] * dxe)
        for ri in T.unroll(R4):
            finish(XS, S, O, B, Y, acc, ri * V, i, r0 + ri)

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
        QA = T.alloc_buffer((m * k,), "int8")
        DXE = T.alloc_buffer((m * groups * 4,), F32)
        XS = T.alloc_buffer((m * groups,), F32)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for i in range(m):
            quantize(X, QA, DXE, XS, i)
        for slab in T.parallel(slabs):
            acc = T.decl_buffer((max(MTILE, R4) * V,), F32, data=ws.data, elem_offset=slab * per_slab)
            se = T.decl_buffer((R4 * groups * 4,), F32, data=ws.data, elem_offset=slab * per_slab + max(MTILE, R4) * V)
            for task_in_slab in range(per_task):
                task = T.bind(slab * per_task + task_in_slab)
                for mo in range(m // MTILE):
                    for rr in range(ROWS):
                        if task * ROWS + rr < n:
                            rows_tile(QA, DXE, XS, C0, S, O, B, Y, acc, se, MTILE, mo * MTILE, task * ROWS + rr)
                for mi in range(m % MTILE):
                    for rb in range(ROWS // R4):
                        if task * ROWS + rb * R4 + R4 <= n:
                            rows4_one_x(QA, DXE, XS, C0, S, O, B, Y, acc, se, m - m % MTILE + mi, task * ROWS + rb * R4)
                        else:
                            for rr in range(R4):
                                if task * ROWS + rb * R4 + rr < n:
                                    rows_tile(QA, DXE, XS, C0, S, O, B, Y, acc, se, 1, m - m % MTILE + mi,
                                              task * ROWS + rb * R4 + rr)

    return with_roles(main, roles)
