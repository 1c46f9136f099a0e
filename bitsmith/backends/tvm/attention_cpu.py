"""Hand-vectorized llvm (CPU) kernel of ``attention`` (same signature and meaning as
``attention.attention_func``).

Why hand-written: the scheduled TE definition walks each query head on its own (the kv head's
keys and values streamed once per query head), keeps scores, probabilities and partial sums in
buffers the size of the context, and calls libm's scalar ``expf`` once per key: at a 512-token
context a SmolLM2 layer took ~57 us hot / ~71 us cold at one thread, a quarter of a decode step.
Here one parallel task takes one (batch row, kv head, query row) and all the query heads that
share that kv head (grouped-query attention), so each key and value row is read once per task
(one task per query head instead, for decode's 3 tasks on 2 threads, measured no faster: 23-25
vs 22-23 us per cold SmolLM2 layer at t = 512):

1. scores, 16 keys at a time: each key row is loaded once per query head of the group (from L1
   after the first) and dotted with it over 16 lanes; the 16 lane vectors are then summed
   "transposed" (adjacent lanes pairwise, 15 two-vector shuffle-and-add steps leave key r's
   score in lane r, ready for the vector max and exp; one tree sum per key instead took ~8
   dependent operations through memory per key and head: SmolLM2 layer at t = 512, one Zen 5
   thread, in cache: 36 -> 24 us); keys the row may not see (causal future: never visited;
   mask zero: -inf) get -inf;
2. max over keys, 16 lanes at a time (max is exact in any order);
3. probabilities ``exp(score - max)``, 16 at a time, by a Cephes-style float32 expf (range
   reduction by ln 2 in two parts, a degree-6 polynomial, the exponent built from bits;
   Moshier, Cephes Math Library: relative error ~2 ulp); below -87.3 (float32's smallest normal)
   the result is exactly 0, so a hidden key (-inf) contributes nothing;
4. one pass over the value rows: each value row is loaded once and added into the group's
   accumulators, and the probability sums are accumulated in the same key order.

Steps 1 and 4 prefetch the key / value row 16 ahead (one thread, SmolLM2 layer at t = 512 from
DRAM: ~40 -> ~32 us; the hardware prefetcher alone left the stream at ~20 GB/s).

Sums over keys (2 and 4) run in key order, one key after another, as the TE kernel does: a
hidden key adds an exact 0, so a row's result does not depend on how many padding keys its batch
adds (decode stays batch-invariant, docs/ragged-batches.md), and the compact and capacity forms
(they are the same code: the capacity form reads slots [0, t) of a larger cache) give the same
bits. Needs ``head_dim % 16 == 0`` and ``value_dim % 16 == 0`` (``supported``); other shapes
keep the TE schedule.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from .matmul_cpu_kernels import F32, V, VF32, prefetch

SLABS = 64  # parallel work items per call (see matmul_cpu_kernels.scratch_layout)
PREFETCH_KEYS = 16  # key / value rows ahead asked of the cache while streaming them

# Cephes expf constants (published formula): exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2 / 2
LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_FLOOR = -87.3365478515625  # exp below this is not a normal float32: taken as 0


def supported(head_dim: int, value_dim: int) -> bool:
    return head_dim % V == 0 and value_dim % V == 0


def _c(x: float):
    return tirx.Broadcast(tirx.const(x, F32), V)


def vexp(x):
    """float32x16 exp of ``x`` (every lane <= 0 here: scores minus their max)."""
    xc = tirx.max(x, _c(EXP_FLOOR))
    n = tirx.floor(xc * _c(LOG2E) + _c(0.5))
    r = xc - n * _c(LN2_HI) - n * _c(LN2_LO)
    p = _c(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = p * r + _c(c)
    y = p * r * r + r + _c(1.0)
    two_n = tirx.reinterpret(VF32, tirx.shift_left(tirx.Cast(f"int32x{V}", n) + tirx.Broadcast(tirx.const(127, "int32"), V),
                                                   tirx.Broadcast(tirx.const(23, "int32"), V)))
    return tirx.Select(x < _c(EXP_FLOOR), _c(0.0), y * two_n)


EVENS, ODDS = list(range(0, 2 * V, 2)), list(range(1, 2 * V, 2))


@T.macro
def pair_sums(tsb, k):
    """Vector k = the adjacent-lane pair sums of vectors 2k and 2k + 1 (its halves, in order)."""
    tsb[T.Ramp(k * V, 1, V)] = (T.Shuffle([tsb[T.Ramp(2 * k * V, 1, V)], tsb[T.Ramp((2 * k + 1) * V, 1, V)]], EVENS)
                               + T.Shuffle([tsb[T.Ramp(2 * k * V, 1, V)], tsb[T.Ramp((2 * k + 1) * V, 1, V)]], ODDS))


@T.macro
def hmax(acc, base):
    """acc[base] = max of the 16 lanes at acc[base:], as a tree (exact in any order)."""
    acc[T.Ramp(base, 1, 8)] = T.max(acc[T.Ramp(base, 1, 8)], acc[T.Ramp(base + 8, 1, 8)])
    acc[T.Ramp(base, 1, 4)] = T.max(acc[T.Ramp(base, 1, 4)], acc[T.Ramp(base + 4, 1, 4)])
    acc[T.Ramp(base, 1, 2)] = T.max(acc[T.Ramp(base, 1, 2)], acc[T.Ramp(base + 2, 1, 2)])
    acc[base] = T.max(acc[base], acc[base + 1])


def attention_cpu_func(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float, causal: bool,
                       dtype: str, mask_dtype: str | None, capacity: bool,
                       kv_dtype: str | None = None) -> tirx.PrimFunc:
    """PrimFunc main(q, k, v, [mask], out), the parameters of ``attention_func`` with the same
    arguments (``capacity`` only names the cache's length dim: both forms run the same code)."""
    if not supported(head_dim, value_dim):
        raise ValueError(f"the vector attention kernel needs head and value dims divisible by {V}")
    g = heads // kv_heads
    dc, ec = head_dim // V, value_dim // V
    neg_inf = tirx.const(float("-inf"), F32)
    has_mask = mask_dtype is not None
    kvt = kv_dtype or dtype  # keys and values: the cache's type (widened to float32 when read)
    per_line = 64 // np.dtype(kvt).itemsize
    k_lines, k_per_line = -(-head_dim // per_line), per_line
    v_lines, v_per_line = -(-value_dim // per_line), per_line

    def _key_end(t, s, i):  # causal: keys past the row's own position are never visited
        return tirx.min(t, i + t - s + 1) if causal else t

    def _visible(M, bi, j):  # a bool mask is the condition itself
        return M[bi, j] if mask_dtype == "bool" else M[bi, j] != tirx.const(0, mask_dtype)

    def _visible16(M, bi, j0):  # keys j0 .. j0 + 15
        m = M[bi, tirx.Ramp(j0, 1, V)]
        return m if mask_dtype == "bool" else m != tirx.Broadcast(tirx.const(0, mask_dtype), V)

    def _part(Q, K, bi, kv, h, i, jr):
        e = T.Cast(VF32, Q[bi, h, i, tirx.Ramp(0, 1, V)]) * T.Cast(VF32, K[bi, kv, jr, tirx.Ramp(0, 1, V)])
        for c in range(1, dc):
            e = e + T.Cast(VF32, Q[bi, h, i, tirx.Ramp(c * V, 1, V)]) * T.Cast(VF32, K[bi, kv, jr, tirx.Ramp(c * V, 1, V)])
        return e

    @T.macro
    def scores16(Q, K, tsb, bi, kv, h, i, j0, jend):
        """tsb[0:16]: lane r = q_h . k_(j0 + r) (rows past jend - 1 read row jend - 1). Each
        key's 16 lane partials are summed as the same tree (adjacent lanes, then adjacent pairs,
        ...), level by level two vectors becoming one (a "transposed" sum), through a small local
        buffer that LLVM keeps in registers: the same sums as one expression of nested Lets,
        which LLVM took ~5 s to compile (of a ~20 s cold model compile) against 0.5 s this way."""
        for r in T.unroll(V):
            tsb[T.Ramp(r * V, 1, V)] = _part(Q, K, bi, kv, h, i, T.min(j0 + r, jend - 1))
        for k in T.unroll(8):
            pair_sums(tsb, k)
        for k in T.unroll(4):
            pair_sums(tsb, k)
        for k in T.unroll(2):
            pair_sums(tsb, k)
        pair_sums(tsb, 0)

    @T.macro
    def task(Q, K, Vv, M, O, ws, tsb, base, tp, t, s, cap, bi, h0, i, hp):
        kv = T.bind(h0 // g)
        P = T.bind(base)                # probabilities [g, tp]
        W = T.bind(base + hp * tp)       # accumulators [g, value_dim]
        L = T.bind(W + hp * value_dim)   # lane vectors [g, 16]
        D = T.bind(L + hp * V)           # sums [g]
        jend = T.bind(_key_end(t, s, i))
        nch = T.bind((jend + V - 1) // V)
        # 1. scores, 16 keys at a time (the last chunk's rows past jend repeat row jend - 1; the
        # scores of those lanes are overwritten with -inf below)
        for cch in range(nch):
            j0 = T.bind(cch * V)
            for r in T.unroll(V):  # the next chunk's key rows (slots < capacity: in bounds)
                for ln in T.unroll(k_lines):
                    T.evaluate(prefetch(K, bi, kv, T.min(j0 + PREFETCH_KEYS + r, cap - 1), ln * k_per_line))
            for gi in range(hp):
                scores16(Q, K, tsb, bi, kv, h0 + gi, i, j0, jend)
                ws[T.Ramp(P + gi * tp + j0, 1, V)] = tsb[T.Ramp(0, 1, V)] * _c(scale)
                if has_mask:
                    if j0 + V <= jend:
                        ws[T.Ramp(P + gi * tp + j0, 1, V)] = T.Select(
                            _visible16(M, bi, j0), ws[T.Ramp(P + gi * tp + j0, 1, V)], T.Broadcast(neg_inf, V))
                    else:
                        for jj in range(jend - j0):
                            ws[P + gi * tp + j0 + jj] = T.Select(_visible(M, bi, j0 + jj), ws[P + gi * tp + j0 + jj],
                                                                 neg_inf)
        for gi in T.unroll(hp):
            for j in range(nch * V - jend):
                ws[P + gi * tp + jend + j] = neg_inf
            # 2. max (lanes, then a tree); a row that sees no key: max 0, every probability 0
            ws[T.Ramp(L + gi * V, 1, V)] = T.Broadcast(neg_inf, V)
            for c in range(nch):
                ws[T.Ramp(L + gi * V, 1, V)] = T.max(ws[T.Ramp(L + gi * V, 1, V)], ws[T.Ramp(P + gi * tp + c * V, 1, V)])
            hmax(ws, L + gi * V)
            mx = T.bind(T.Select(ws[L + gi * V] == neg_inf, T.float32(0), ws[L + gi * V]))
            # 3. probabilities
            for c in range(nch):
                ws[T.Ramp(P + gi * tp + c * V, 1, V)] = vexp(ws[T.Ramp(P + gi * tp + c * V, 1, V)] - T.Broadcast(mx, V))
            ws[D + gi] = T.float32(0)
            for e in T.unroll(ec):
                ws[T.Ramp(W + gi * value_dim + e * V, 1, V)] = T.Broadcast(T.float32(0), V)
        # 4. probabilities times values, and their sums, in key order
        for j in range(jend):
            for ln in T.unroll(v_lines):
                T.evaluate(prefetch(Vv, bi, kv, T.min(j + PREFETCH_KEYS, cap - 1), ln * v_per_line))
            for e in T.unroll(ec):
                vv = T.bind(T.Cast(VF32, Vv[bi, kv, j, T.Ramp(e * V, 1, V)]))
                for gi in T.unroll(hp):
                    ws[T.Ramp(W + gi * value_dim + e * V, 1, V)] = (ws[T.Ramp(W + gi * value_dim + e * V, 1, V)]
                                                                  + T.Broadcast(ws[P + gi * tp + j], V) * vv)
            for gi in T.unroll(hp):
                ws[D + gi] = ws[D + gi] + ws[P + gi * tp + j]
        for gi in T.unroll(hp):
            for e in T.unroll(ec):
                O[bi, h0 + gi, i, T.Ramp(e * V, 1, V)] = T.Cast(f"{dtype}x{V}", T.Select(
                    T.Broadcast(ws[D + gi], V) > T.Broadcast(T.float32(0), V),
                    ws[T.Ramp(W + gi * value_dim + e * V, 1, V)] / T.Broadcast(ws[D + gi], V),
                    T.Broadcast(T.float32(0), V)))

    @T.macro
    def tasks(Q, K, Vv, M, O, b, s, t, cap, hp):
        total = T.bind(b * (heads // hp) * s)
        slabs = T.bind(T.max(T.min(total, T.int64(SLABS)), T.int64(1)))
        per_task = T.bind((total + slabs - 1) // slabs)
        tp = T.bind((t + V - 1) // V * V)
        # per slab: hp rows of probabilities (t rounded up to 16), hp * value_dim accumulators,
        # hp lane vectors for the tree sums, hp sums
        per_slab = T.bind(hp * tp + hp * value_dim + hp * V + -(-hp // V) * V)
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for slab in T.parallel(slabs):
            tsb = T.alloc_buffer((V * V,), F32, scope="local")  # per thread: scores16's tree
            for n in range(per_task):
                if slab * per_task + n < total:
                    item = T.bind(slab * per_task + n)
                    task(Q, K, Vv, M, O, ws, tsb, slab * per_slab, tp, t, s, cap, item // (heads // hp * s),
                         item // s % (heads // hp) * hp, item % s, hp)

    @T.macro
    def body(Q, K, Vv, M, O, b, s, t, cap):
        tasks(Q, K, Vv, M, O, b, s, t, cap, g)

    if has_mask:
        @T.prim_func(s_tir=True)
        def main(q: T.handle, k: T.handle, v: T.handle, mask: T.handle, out: T.handle):
            T.func_attr({"tirx.noalias": True})
            b, s, t, c = T.int64(), T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q, (b, heads, s, head_dim), dtype)
            K = T.match_buffer(k, (b, kv_heads, c, head_dim), kvt)
            Vv = T.match_buffer(v, (b, kv_heads, c, value_dim), kvt)
            M = T.match_buffer(mask, (b, t), mask_dtype)
            O = T.match_buffer(out, (b, heads, s, value_dim), dtype)
            body(Q, K, Vv, M, O, b, s, t, c)
    else:
        @T.prim_func(s_tir=True)
        def main(q: T.handle, k: T.handle, v: T.handle, out: T.handle):
            T.func_attr({"tirx.noalias": True})
            b, s, t = T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q, (b, heads, s, head_dim), dtype)
            K = T.match_buffer(k, (b, kv_heads, t, head_dim), kvt)
            Vv = T.match_buffer(v, (b, kv_heads, t, value_dim), kvt)
            O = T.match_buffer(out, (b, heads, s, value_dim), dtype)
            body(Q, K, Vv, None, O, b, s, t, t)
    return main
