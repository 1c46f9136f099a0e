"""Hand-vectorized llvm (CPU) kernels for ``linear`` and ``qlinear`` (TVMScript generators).

Why hand-written: decoding a grid value per weight wants a byte shuffle (``pshufb``: 16 int8
grid values indexed by 16 codes in one instruction); a scheduled TE gather would become a slow
vector gather. Each kernel has exactly the signature of its ``KernelDef`` so the executor can
use either.

Structure (both kernels): a parallel loop over tiles of ``Tiling.rows`` output rows; inside,
m is walked in tiles of ``Tiling.mtile`` rows (each weight chunk loaded/decoded once, used
mtile times: prefill) and then the leftover rows one at a time (m == 1 decode: one pass over the
weights). qlinear on AVX-512 (``QLINEAR_TILING_AVX512``) takes tiles of 8, then one of 4, then
single rows: 8 accumulators fit AVX-512's 32 registers; on AVX2 (16 registers, two per float32x16)
they spill and tiles of 4 stay faster (SmolLM2 prefill of 512 tokens, one thread: 209 -> 249
tokens/s on Zen 4 with 8, 182 -> 151 with 8 on code built for znver3). The branch on m happens
at run time, so one compiled kernel serves every m.

A row's reduction runs over chunks of 16 weights. qlinear: the chunk's codes come out of 16
aligned bytes (shift + mask, see ``qlinear_layout``), become grid values through ``pshufb``
with the group's 16-entry int8 table (or ``code - zero``; affine GGUF grids: ``code + low``), are widened to float32x16 and
multiplied by 16 activations (gathered at the kept columns under N:M). With one activation
row, products are summed per group and scaled once per group (``Tiling.grouped``); in m-tiles
each chunk is scaled before use, and so is every chunk of a scheme with float offsets
(``value * scale + offset``, one FMA: the dequantized weight itself). ``Tiling.acc1`` independent accumulators hide FMA latency.
A short last group's whole chunks run the same path; its last ``len % 16`` weights, the CSR
outliers (exact per-row range) and the bias are scalar. Dense: same skeleton without decode;
with one activation row ``Tiling.row_block`` weight rows share each activation load.
Nothing larger than one 16-weight chunk is ever decoded, and it lives in registers.
Targets without SSSE3 (non-x86) get a gather from the table instead of ``pshufb``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm import tirx
from tvm.script import tirx as T

from .qlinear_layout import LANES, QLinearLayout, chunk_fields

V = LANES  # weights per chunk
F32 = "float32"
VF32 = f"float32x{V}"


@dataclass(frozen=True)
class Tiling:
    rows: int = 8  # output rows per parallel task
    mtile: int = 4  # activation rows sharing one decoded chunk (qlinear: 8 where the CPU has 32 vector registers)
    acc1: int = 2  # independent accumulators per row when m is walked one row at a time
    unroll: int = 4  # chunks per inner iteration (dense)
    row_block: int = 1  # dense, one activation row: weight rows sharing each x load (divides rows)
    grouped: bool = True  # qlinear, one row: scale group sums instead of every weight


def _vload(buf, row, start):
    return buf[row, tirx.Ramp(start, 1, V)]


def _field_vec(buf, width: int, n, c):
    """uint8x16: fields of chunk ``c`` (16 consecutive fields) of row ``n`` of a sliced16 stream."""
    per_byte = 8 // width
    raw = buf[n, tirx.Ramp(tirx.floordiv(c, per_byte) * V, 1, V)]
    shift = tirx.Cast("uint8", width * tirx.floormod(c, per_byte))
    return tirx.bitwise_and(tirx.shift_right(raw, tirx.Broadcast(shift, V)),
                            tirx.Broadcast(tirx.const((1 << width) - 1, "uint8"), V))


def _field_scalar(buf, width: int, n, kk):
    per_byte = 8 // width
    raw = buf[n, tirx.floordiv(kk, chunk_fields(width)) * V + tirx.floormod(kk, V)]
    shift = tirx.Cast("uint8", width * tirx.floormod(tirx.floordiv(kk, V), per_byte))
    return tirx.bitwise_and(tirx.shift_right(raw, shift), tirx.const((1 << width) - 1, "uint8"))


@T.macro
def hsum(acc, base):
    """acc[base] = sum of the 16 lanes at acc[base:], as a tree (a scalar chain would serialize
    16 dependent adds); acc[base] then serves as the row's scalar accumulator."""
    acc[T.Ramp(base, 1, 8)] = acc[T.Ramp(base, 1, 8)] + acc[T.Ramp(base + 8, 1, 8)]
    acc[T.Ramp(base, 1, 4)] = acc[T.Ramp(base, 1, 4)] + acc[T.Ramp(base + 4, 1, 4)]
    acc[T.Ramp(base, 1, 2)] = acc[T.Ramp(base, 1, 2)] + acc[T.Ramp(base + 2, 1, 2)]
    acc[base] = acc[base] + acc[base + 1]


PREFETCH_ROWS = 16  # weight rows ahead that a one-activation-row pass asks the cache for


def prefetch(buf, *index):
    """``llvm.prefetch`` (read, keep in all cache levels) of ``buf[index]``'s cache line."""
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(buf[index]), tirx.const(0, "int32"),
                                 tirx.const(3, "int32"), tirx.const(1, "int32"))


def row_lines(shape, dtype: str) -> tuple[int, int]:
    """(cache lines per row, elements per cache line) of a 2-D operand (for ``prefetch_row``)."""
    bits = np.dtype(dtype).itemsize * 8
    per_line = 512 // bits
    return -(-int(shape[1]) // per_line), per_line


@T.macro
def prefetch_row(buf, lines, per_line, r, n):
    """Software prefetch of row ``min(r, n - 1)`` of ``buf``: one activation row makes a kernel a
    single pass over its weights, and the hardware prefetcher alone kept one thread at ~13 GB/s of
    ~25 (SmolLM2 1536 x 576 Q4_1 rows from DRAM: 42 -> 26 us)."""
    for ln in T.unroll(lines):
        T.evaluate(prefetch(buf, T.min(r, n - 1), ln * per_line))


SLABS = 64  # parallel work items per call: each owns one slice of a per-call scratch buffer


def scratch_layout(tasks: int, floats: int) -> tuple[int, int, int]:
    """(slabs, tasks per slab, floats per slab, a multiple of 16 so every slice stays 64-byte
    aligned). TVM 0.27 turns every local allocation on CPU into a TVMBackendAllocWorkspace call
    (no stack allocas; a plain ``v = expr`` in TVMScript is such an allocation too, hence
    ``T.bind``), so the kernels allocate one scratch buffer per call, outside the parallel loop,
    and each parallel slab works in its own slice. Loops start at 0: a loop starting at a value
    loaded from memory (the CSR row start) gave wrong sums in later slabs in our tests.
    No slab is left empty: TVM hands each thread an equal run of slabs, so 72 tasks as 64 slabs
    of 2 (36 busy) put 64 of the 72 on one of two threads (SmolLM2's 576-row layers scaled
    1.1x from 1 to 2 threads); as 36 slabs of 2 each thread gets half."""
    per_task = -(-tasks // min(tasks, SLABS))
    return -(-tasks // per_task), per_task, -(-floats // V) * V


DENSE_TILING = Tiling(rows=16, acc1=4, unroll=4, row_block=4)  # memory-bound: more loads in flight per row
QLINEAR_TILING_AVX512 = Tiling(mtile=8)


def dense_kernel(k: int, n: int, has_bias: bool, act: str, wdt: str, t: Tiling = DENSE_TILING):
    """PrimFunc main(x [m, k] act, w [n, k] wdt, [bias [n] act], y [m, n] act)."""
    kc, kt = k // V, k % V
    unroll = t.unroll
    acc_n = max(t.acc1, 1)
    tasks = -(-n // t.rows)
    rows = t.rows

    @T.macro
    def row(X, W, B, Y, acc, mt, acc_count, m0, r):
        for z in T.unroll(mt * acc_count):
            acc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for cb in range(kc // unroll):
            for u in T.unroll(unroll):
                wv = T.bind(T.Cast(VF32, _vload(W, r, (cb * unroll + u) * V)))
                for mi in T.unroll(mt):
                    acc[T.Ramp((mi * acc_count + u % acc_count) * V, 1, V)] = (
                        acc[T.Ramp((mi * acc_count + u % acc_count) * V, 1, V)]
                        + T.Cast(VF32, _vload(X, m0 + mi, (cb * unroll + u) * V)) * wv)
        for c in range(kc % unroll):
            wv = T.bind(T.Cast(VF32, _vload(W, r, (kc // unroll * unroll + c) * V)))
            for mi in T.unroll(mt):
                acc[T.Ramp(mi * acc_count * V, 1, V)] = (
                    acc[T.Ramp(mi * acc_count * V, 1, V)]
                    + T.Cast(VF32, _vload(X, m0 + mi, (kc // unroll * unroll + c) * V)) * wv)
        for mi in T.unroll(mt):
            for a in T.unroll(acc_count - 1):
                acc[T.Ramp(mi * acc_count * V, 1, V)] = (acc[T.Ramp(mi * acc_count * V, 1, V)]
                                                       + acc[T.Ramp((mi * acc_count + a + 1) * V, 1, V)])
            hsum(acc, mi * acc_count * V)
            for j in range(kt):
                acc[mi * acc_count * V] = acc[mi * acc_count * V] + T.Cast(F32, X[m0 + mi, kc * V + j]) * T.Cast(
                    F32, W[r, kc * V + j])
            if has_bias:
                acc[mi * acc_count * V] = acc[mi * acc_count * V] + T.Cast(F32, B[r])
            Y[m0 + mi, r] = T.Cast(act, acc[mi * acc_count * V])

    nr = t.row_block
    slabs, per_task, per_slab = scratch_layout(tasks, max(t.mtile * acc_n, nr) * V)

    @T.macro
    def rows_one_x(X, W, B, Y, acc, m0, r0):
        """``nr`` weight rows against one activation row: the x chunk is loaded once for all."""
        for z in T.unroll(nr):
            acc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for cb in range(kc // unroll):
            for u in T.unroll(unroll):
                xv = T.bind(T.Cast(VF32, _vload(X, m0, (cb * unroll + u) * V)))
                for z in T.unroll(nr):
                    acc[T.Ramp(z * V, 1, V)] = acc[T.Ramp(z * V, 1, V)] + xv * T.Cast(
                        VF32, _vload(W, r0 + z, (cb * unroll + u) * V))
        for c in range(kc % unroll):
            xv = T.bind(T.Cast(VF32, _vload(X, m0, (kc // unroll * unroll + c) * V)))
            for z in T.unroll(nr):
                acc[T.Ramp(z * V, 1, V)] = acc[T.Ramp(z * V, 1, V)] + xv * T.Cast(
                    VF32, _vload(W, r0 + z, (kc // unroll * unroll + c) * V))
        for z in T.unroll(nr):
            hsum(acc, z * V)
            for j in range(kt):
                acc[z * V] = acc[z * V] + T.Cast(F32, X[m0, kc * V + j]) * T.Cast(F32, W[r0 + z, kc * V + j])
            if has_bias:
                acc[z * V] = acc[z * V] + T.Cast(F32, B[r0 + z])
            Y[m0, r0 + z] = T.Cast(act, acc[z * V])

    @T.prim_func(s_tir=True)
    def main(x: T.handle, w: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        W = T.match_buffer(w, (n, k), wdt)
        B = T.match_buffer(bias, (n,), act)
        Y = T.match_buffer(y, (m, n), act)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for slab in T.parallel(slabs):
            acc = T.decl_buffer((per_slab,), F32, data=ws.data, elem_offset=slab * per_slab)
            for task_in_slab in range(per_task):  # task index past the end: rows guard below
                task = T.bind(slab * per_task + task_in_slab)
                for mo in range(m // t.mtile):
                    for rr in range(rows):
                        if task * rows + rr < n:
                            row(X, W, B, Y, acc, t.mtile, 1, mo * t.mtile, task * rows + rr)
                for mi in range(m % t.mtile):
                    for rb in range(rows // nr):
                        if task * rows + rb * nr + nr <= n:
                            rows_one_x(X, W, B, Y, acc, m // t.mtile * t.mtile + mi, task * rows + rb * nr)
                        else:
                            for rr in range(nr):
                                if task * rows + rb * nr + rr < n:
                                    row(X, W, B, Y, acc, 1, acc_n, m // t.mtile * t.mtile + mi,
                                        task * rows + rb * nr + rr)

    keep = [0, 1] + ([2] if has_bias else []) + [3]
    return tirx.PrimFunc([main.params[i] for i in keep], main.body, main.ret_type, main.attrs)


def role_lookup(roles: list[str], shapes: list[tuple[tuple[int, ...], str]]):
    """(shape of role, dtype of role or a default): the operands a layout has, by role name; a role
    the layout lacks gets shape (1,) (its parameter is dropped from the kernel afterwards)."""
    shape_of = dict(zip(roles, shapes))

    def shp(role):
        return shape_of[role][0] if role in shape_of else (1,)

    def dt(role, default):
        return shape_of[role][1] if role in shape_of else default

    return shp, dt


def _pshufb(table, idx):
    return tirx.call_llvm_pure_intrin(f"int8x{V}", "llvm.x86.ssse3.pshuf.b.128", table,
                                      tirx.reinterpret(f"int8x{V}", idx))


def qlinear_kernel(lay: QLinearLayout, shapes: list[tuple[tuple[int, ...], str]], act: str,
                   use_pshufb: bool, t: Tiling = Tiling()):
    """PrimFunc with the params of ``matmul_defs.qlinear_func(lay, shapes, act)``.
    Needs ``lay.group_size % 16 == 0`` (a chunk never straddles two groups)."""
    if lay.group_size % V:
        raise ValueError("the vector qlinear kernel needs group_size % 16 == 0")
    roles = lay.roles()
    shp, dt = role_lookup(roles, shapes)
    k, n, gs = lay.in_features, lay.out_features, lay.group_size
    two_streams = len(lay.code_streams) == 2
    w0 = lay.code_streams[0][0]
    asym, has_sel, has_bias, offs = lay.asymmetric, lay.has_selectors, lay.has_bias, lay.offsets
    nm = lay.nm is not None
    nm_keep, nm_block = lay.nm if nm else (1, 1)
    nm_w = lay.nm_width if nm else 1
    ell = lay.outlier_width
    cg = gs // V  # chunks per group
    # group sums scaled once need no per-weight offset; with offsets every chunk is decoded in full
    grouped = t.grouped and not offs
    unroll = next(u for u in (8, 4, 2, 1) if cg % u == 0)
    gfull = lay.kept // gs
    tail = lay.kept - gfull * gs
    tail_chunks, tail_scalar = tail // V, tail % V
    acc_n = max(t.acc1, 1)
    tasks = -(-n // t.rows)
    rows = t.rows
    acc_len = max(t.mtile, acc_n) * acc_n * V
    small = t.mtile // 2 if t.mtile >= 8 else t.mtile  # leftover rows: tiles of ``small``, then singles
    slabs, per_task, per_slab = scratch_layout(tasks, acc_len + acc_n * V)

    pf_c0, pf_s = row_lines(shp("codes0"), "uint8"), row_lines(shp("scales"), lay.scale_dtype)
    pf_c1 = row_lines(shp("codes1"), "uint8") if two_streams else (0, 1)
    pf_z = row_lines(shp("zeros"), "uint8") if asym else (0, 1)
    pf_o = row_lines(shp("offsets"), lay.scale_dtype) if offs else (0, 1)

    def code_vec(C0, C1, r, c):
        code = _field_vec(C0, w0, r, c)
        if two_streams:
            code = tirx.bitwise_or(code, tirx.shift_left(_field_vec(C1, 1, r, c),
                                                         tirx.Broadcast(tirx.const(2, "uint8"), V)))
        return code

    def code_scalar(C0, C1, r, kk):
        code = _field_scalar(C0, w0, r, kk)
        if two_streams:
            code = tirx.bitwise_or(code, tirx.shift_left(_field_scalar(C1, 1, r, kk), tirx.const(2, "uint8")))
        return code

    def value_vec(C0, C1, Z, G, SEL, r, g, c):
        code = code_vec(C0, C1, r, c)
        if asym:
            return tirx.Cast(VF32, code) - tirx.Broadcast(tirx.Cast(F32, Z[r, g]), V)
        if lay.affine:
            value = tirx.Cast(VF32, code)
            return value + tirx.Broadcast(tirx.const(float(lay.grid_low), F32), V) if lay.grid_low else value
        sel = tirx.Cast("int32", SEL[r, g]) if has_sel else 0
        if use_pshufb:
            return tirx.Cast(VF32, _pshufb(G[sel, tirx.Ramp(0, 1, V)], code))
        return tirx.Cast(VF32, G[sel, tirx.Cast(f"int32x{V}", code)])

    def value_scalar(C0, C1, Z, G, SEL, r, g, kk):
        code = code_scalar(C0, C1, r, kk)
        if asym:
            return tirx.Cast(F32, code) - tirx.Cast(F32, Z[r, g])
        if lay.affine:
            return tirx.Cast(F32, code) + tirx.const(float(lay.grid_low), F32)
        sel = tirx.Cast("int32", SEL[r, g]) if has_sel else 0
        return tirx.Cast(F32, G[sel, tirx.Cast("int32", code)])

    def xvec(X, NMI, i, r, c):
        if not nm:
            return tirx.Cast(VF32, _vload(X, i, c * V))
        cols = (tirx.floordiv(tirx.Ramp(c * V, 1, V), nm_keep) * nm_block
                + tirx.Cast(f"int32x{V}", _field_vec(NMI, nm_w, r, c)))
        return tirx.Cast(VF32, X[i, cols])

    def xscalar(X, NMI, i, r, kk):
        if not nm:
            return tirx.Cast(F32, X[i, kk])
        col = tirx.floordiv(kk, nm_keep) * nm_block + tirx.Cast("int32", _field_scalar(NMI, nm_w, r, kk))
        return tirx.Cast(F32, X[i, col])

    def scale_vec(S, r, g):
        return tirx.Broadcast(tirx.Cast(F32, S[r, g]), V)

    def weight_vec(C0, C1, S, Z, O, G, SEL, r, g, c):
        """The chunk's float32 weights: value * scale (+ offset, one FMA: value * scale is exact
        for the GGUF types, so this is the dequantized weight bit for bit)."""
        w = value_vec(C0, C1, Z, G, SEL, r, g, c) * scale_vec(S, r, g)
        return w + tirx.Broadcast(tirx.Cast(F32, O[r, g]), V) if offs else w

    def weight_scalar(C0, C1, S, Z, O, G, SEL, r, g, kk):
        w = value_scalar(C0, C1, Z, G, SEL, r, g, kk) * tirx.Cast(F32, S[r, g])
        return w + tirx.Cast(F32, O[r, g]) if offs else w

    @T.macro
    def chunk(X, C0, C1, S, Z, O, G, SEL, NMI, acc, mt, acc_count, slot, m0, r, g, c, scaled):
        if scaled:
            wv = T.bind(weight_vec(C0, C1, S, Z, O, G, SEL, r, g, c))
        else:
            wv = T.bind(value_vec(C0, C1, Z, G, SEL, r, g, c))
        for mi in T.unroll(mt):
            acc[T.Ramp((mi * acc_count + slot) * V, 1, V)] = (
                acc[T.Ramp((mi * acc_count + slot) * V, 1, V)] + xvec(X, NMI, m0 + mi, r, c) * wv)

    @T.macro
    def row(X, C0, C1, S, Z, O, G, SEL, NMI, OC, OD, RP, B, Y, acc, gacc, mt, acc_count, grouped, m0, r):
        if mt == 1:  # one activation row: a single pass over the weights, memory-bound
            prefetch_row(C0, pf_c0[0], pf_c0[1], r + PREFETCH_ROWS, n)
            if two_streams:
                prefetch_row(C1, pf_c1[0], pf_c1[1], r + PREFETCH_ROWS, n)
            prefetch_row(S, pf_s[0], pf_s[1], r + PREFETCH_ROWS, n)
            if asym:
                prefetch_row(Z, pf_z[0], pf_z[1], r + PREFETCH_ROWS, n)
            if offs:
                prefetch_row(O, pf_o[0], pf_o[1], r + PREFETCH_ROWS, n)
        for z in T.unroll(mt * acc_count):
            acc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for g in range(gfull):
            if grouped:  # one row: sum x * grid value over the group, then scale once
                for z in T.unroll(acc_count):
                    gacc[T.Ramp(z * V, 1, V)] = T.Broadcast(T.float32(0), V)
                for cb in range(cg // unroll):
                    for u in T.unroll(unroll):
                        chunk(X, C0, C1, S, Z, O, G, SEL, NMI, gacc, 1, acc_count, u % acc_count, m0, r, g,
                              g * cg + cb * unroll + u, False)
                for z in T.unroll(acc_count - 1):
                    gacc[T.Ramp(0, 1, V)] = gacc[T.Ramp(0, 1, V)] + gacc[T.Ramp((z + 1) * V, 1, V)]
                acc[T.Ramp(0, 1, V)] = acc[T.Ramp(0, 1, V)] + gacc[T.Ramp(0, 1, V)] * scale_vec(S, r, g)
            else:
                for cb in range(cg // unroll):
                    for u in T.unroll(unroll):
                        chunk(X, C0, C1, S, Z, O, G, SEL, NMI, acc, mt, acc_count, u % acc_count, m0, r, g,
                              g * cg + cb * unroll + u, True)
        for c in range(tail_chunks):
            chunk(X, C0, C1, S, Z, O, G, SEL, NMI, acc, mt, acc_count, 0, m0, r, gfull, gfull * cg + c, True)
        for mi in T.unroll(mt):
            for a in T.unroll(acc_count - 1):
                acc[T.Ramp(mi * acc_count * V, 1, V)] = (acc[T.Ramp(mi * acc_count * V, 1, V)]
                                                       + acc[T.Ramp((mi * acc_count + a + 1) * V, 1, V)])
            hsum(acc, mi * acc_count * V)
            for j in range(tail_scalar):
                acc[mi * acc_count * V] = acc[mi * acc_count * V] + xscalar(
                    X, NMI, m0 + mi, r, gfull * gs + tail_chunks * V + j) * weight_scalar(
                    C0, C1, S, Z, O, G, SEL, r, gfull, gfull * gs + tail_chunks * V + j)
            if ell > 0:
                for e in range(RP[r + 1] - RP[r]):  # loops starting at 0: see scratch_layout
                    acc[mi * acc_count * V] = acc[mi * acc_count * V] + T.Cast(
                        F32, X[m0 + mi, OC[RP[r] + e]]) * OD[RP[r] + e]
            if has_bias:
                acc[mi * acc_count * V] = acc[mi * acc_count * V] + T.Cast(F32, B[r])
            Y[m0 + mi, r] = T.Cast(act, acc[mi * acc_count * V])

    @T.prim_func(s_tir=True)
    def main(x: T.handle, c0: T.handle, c1: T.handle, scales: T.handle, zeros: T.handle, grid: T.handle,
             offsets: T.handle, selectors: T.handle, nm_index: T.handle, ocols: T.handle, ocorr: T.handle, optr: T.handle,
             bias: T.handle,
             y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        C0 = T.match_buffer(c0, shp("codes0"), "uint8")
        C1 = T.match_buffer(c1, shp("codes1"), "uint8")
        S = T.match_buffer(scales, shp("scales"), lay.scale_dtype)
        Z = T.match_buffer(zeros, shp("zeros"), "uint8")
        G = T.match_buffer(grid, shp("grid"), "int8")
        O = T.match_buffer(offsets, shp("offsets"), lay.scale_dtype)
        SEL = T.match_buffer(selectors, shp("selectors"), "uint8")
        NMI = T.match_buffer(nm_index, shp("nm_index"), "uint8")
        OC = T.match_buffer(ocols, shp("outlier_cols"), "int32")
        OD = T.match_buffer(ocorr, shp("outlier_corrections"), "float32")
        RP = T.match_buffer(optr, shp("outlier_rowptr"), "int32")
        B = T.match_buffer(bias, shp("bias"), dt("bias", act))
        Y = T.match_buffer(y, (m, n), act)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for slab in T.parallel(slabs):
            acc = T.decl_buffer((acc_len,), F32, data=ws.data, elem_offset=slab * per_slab)
            gacc = T.decl_buffer((acc_n * V,), F32, data=ws.data, elem_offset=slab * per_slab + acc_len)
            for task_in_slab in range(per_task):  # task index past the end: rows guard below
                task = T.bind(slab * per_task + task_in_slab)
                for mo in range(m // t.mtile):
                    for rr in range(rows):
                        if task * rows + rr < n:
                            row(X, C0, C1, S, Z, O, G, SEL, NMI, OC, OD, RP, B, Y, acc, gacc, t.mtile, 1, False,
                                mo * t.mtile, task * rows + rr)
                if small < t.mtile:  # then one tile of ``small`` rows (4 of a 4-row batch decode)
                    for ms in range(m % t.mtile // small):
                        for rr in range(rows):
                            if task * rows + rr < n:
                                row(X, C0, C1, S, Z, O, G, SEL, NMI, OC, OD, RP, B, Y, acc, gacc, small, 1, False,
                                    m // t.mtile * t.mtile + ms * small, task * rows + rr)
                for mi in range(m % small):
                    for rr in range(rows):
                        if task * rows + rr < n:
                            row(X, C0, C1, S, Z, O, G, SEL, NMI, OC, OD, RP, B, Y, acc, gacc, 1, acc_n, grouped,
                                m - m % small + mi, task * rows + rr)

    names = ["x", "codes0", "codes1", "scales", "zeros", "grid", "offsets", "selectors", "nm_index",
             "outlier_cols", "outlier_corrections", "outlier_rowptr", "bias", "y"]
    keep = [0] + [names.index(r) for r in roles] + [len(names) - 1]
    return tirx.PrimFunc([main.params[i] for i in keep], main.body, main.ret_type, main.attrs)
