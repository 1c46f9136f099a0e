"""tvm-cuda attention without a scores buffer: split-KV decode with a unified max, tiled prefill.

The op is ``attention(q, k, v[, mask])`` of ``attention.attention_kernel``: q [b, h, s, d],
k [b, kvh, t, d], v [b, kvh, t, dv], bottom-right causal (row i sees keys j <= i + t - s),
mask [b, t] nonzero = attend, query head h reads kv head h // (h / kvh), a row that sees no
key gives zeros. Scores, exponentials and sums are float32; q, k, v, out are ``dtype``
(float16 under act_dtype float16, so the KV cache the attention reads is fp16).

The kernels are written directly as TIR (thread layout, shared memory and syncs explicit), so
one library holds two functions that take the same arguments (q, k, v, [mask], the three
split buffers, out); the runtime picks one per call by the query length
(``cuda_runtime.AttentionDispatch``):

* ``main_decode`` (s <= DECODE_MAX_SEQ), FlashDecoding (Dao et al. 2023, "Flash-Decoding
  for long-context inference") with the asynchronized softmax of FlashDecoding++ (Hong et
  al., "FlashDecoding++: Faster Large Language Model Inference on GPUs", MLSys 2024, §3):
  the key axis is cut into chunks of SPLIT keys counted from the right end (chunk c holds
  keys [t - (c+1)·SPLIT, t - c·SPLIT)); one thread block per (row, head, chunk) computes
  p_j = exp(x_j - phi) with a unified max ``phi`` fixed at compile time, so no chunk waits
  for any other's max, and writes unnormalised partials o_c = Σ p_j v_j, l_c = Σ p_j and its
  reference r_c = phi. A chunk whose scores leave the safe window (some x_j - phi > HIGH:
  exp could overflow; or its largest visible x_j - phi < LOW: every term would underflow)
  is recomputed with its own max (r_c = max_j x_j) from the scores it keeps in shared memory.
  A second kernel combines the chunks in a fixed order: M = max r_c over chunks with l_c > 0,
  out = Σ o_c e^{r_c - M} / Σ l_c e^{r_c - M}; chunks on phi have factor exactly 1.
* ``main`` (any s), FlashAttention-2 style (Dao, "FlashAttention-2", 2023): one block per
  (tile of PREFILL_ROWS query rows, head, batch), one thread per query row; K/V tiles of
  PREFILL_KEYS keys (again counted from the right end) are staged in shared memory and each
  row keeps an online softmax (running max m, sum l, accumulator) in registers.

Chunks and tiles are aligned to the right end of the key axis and tiles that hold no visible
key change nothing, so a row's result does not depend on how much left padding its batch adds
(decode batch invariance, docs/ragged-batches.md). ``tests/attention_emulation.py`` emulates
both algorithms in numpy, chunking and fallback rule included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cuda_scratch import ScratchSpec
from .kernel import KernelDef

SPLIT = 128           # keys per decode chunk = threads per decode block
DECODE_MAX_SEQ = 4    # query rows up to which the split-KV kernel runs
PREFILL_ROWS = 64     # query rows (= threads) per prefill block
PREFILL_KEYS = 16     # keys per prefill K/V tile
COMBINE_THREADS = 64


@dataclass(frozen=True)
class UnifiedMax:
    """The unified max phi and the window [LOW, HIGH] of x - phi a chunk may use it in.

    Scores are float32: exp(x - phi) stays finite for x - phi < 88.7, and a sum of SPLIT
    terms per chunk times up to 2^20 chunks stays below float32's 3.4e38 for x - phi <= 60.
    Below, terms under exp(-87) flush to zero (fast math); a chunk whose largest term is
    >= exp(LOW) = exp(-60) loses only terms < e^-27 relative to it. Outside the window the
    chunk falls back to its own max. ``phi`` is where scaled attention scores of LLMs sit:
    FlashDecoding++ reports over 99.99% of Llama2-7B's softmax inputs in [-16.8, 6.5];
    phi = 0 keeps that whole range 60 away from both edges, so the fallback is rare.
    """

    phi: float = 0.0
    low: float = -60.0
    high: float = 60.0


DEFAULT_UNIFIED_MAX = UnifiedMax()


def _visible_fn(causal: bool, has_mask: bool, mask_dtype: str | None):
    """A TIR expression builder: is key j visible to query row i of batch bi."""
    from tvm.script import tirx as T

    def visible(M, bi, i, j, s, t):
        conds = [j >= T.int64(0)]
        if causal:
            conds.append(j <= i + (t - s))
        if has_mask:
            conds.append(M[bi, j] if mask_dtype == "bool" else M[bi, j] != T.Cast(mask_dtype, 0))
        out = conds[0]
        for c in conds[1:]:
            out = T.And(out, c)
        return out

    return visible


def flash_attention_kernel(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float, causal: bool,
                           dtype: str, mask_dtype: str | None = None,
                           unified: UnifiedMax = DEFAULT_UNIFIED_MAX) -> KernelDef:
    """The KernelDef (an IRModule with "main" and "main_decode", already scheduled) and its
    split buffers as scratch parameters (see the module docstring)."""
    from tvm import IRModule
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    main = _prefill(heads, kv_heads, head_dim, value_dim, scale, causal, dtype, mask_dtype)
    decode = _decode(heads, kv_heads, head_dim, value_dim, scale, causal, dtype, mask_dtype, unified)
    mod = IRModule({"main": main.with_attr("global_symbol", "main"),
                    "main_decode": decode.with_attr("global_symbol", "main_decode")})
    n_in = 4 if mask_dtype else 3
    part = (0, 0), heads, (0, 2, 1, DECODE_MAX_SEQ), (1, 2, SPLIT, 0)
    scratch = (ScratchSpec(n_in, (*part, value_dim), "float32"), ScratchSpec(n_in + 1, part, "float32"),
               ScratchSpec(n_in + 2, part, "float32"))
    name = (f"flash_attention_h{heads}_kv{kv_heads}_d{head_dim}_{dtype}{'_causal' if causal else ''}"
            f"{'_mask_' + mask_dtype if mask_dtype else ''}_phi{unified.phi:g}")
    return KernelDef(name, mod, "flash-attention", scratch)


# ---------------------------------------------------------------- decode: split-KV, unified max

def _decode(H: int, KH: int, D: int, DV: int, scale: float, causal: bool, dtype: str, mask_dtype: str | None,
            um: UnifiedMax):
    from tvm.script import tirx as T  # here, not at import: a runtime-only TVM (GPU machine) lacks the parser
    G = H // KH
    C = SPLIT
    LOG = int(math.log2(C))
    groups = C // DV if DV <= C and C % DV == 0 else 1   # key groups in the P·V phase
    lanes = C // groups                                    # threads per group (over e)
    ept = (DV + lanes - 1) // lanes                        # value dims per thread
    dq = (D + C - 1) // C
    phi, low, high = float(um.phi), float(um.low), float(um.high)
    has_mask = mask_dtype is not None
    visible = _visible_fn(causal, has_mask, mask_dtype)
    neg_inf = T.float32(float("-inf"))
    CT = COMBINE_THREADS
    ect = (DV + CT - 1) // CT

    @T.macro
    def split_body(Q, K, V, M, OP, LP, RP, b, s, t):
        for blk_z in T.thread_binding(b * s, thread="blockIdx.z"):
            for h in T.thread_binding(H, thread="blockIdx.y"):
                for c in T.thread_binding((t + T.int64(C - 1)) // T.int64(C), thread="blockIdx.x"):
                    for tx in T.thread_binding(C, thread="threadIdx.x"):
                        qs = T.alloc_buffer((D,), "float32", scope="shared")
                        xs = T.alloc_buffer((C,), "float32", scope="shared")
                        ps = T.alloc_buffer((C,), "float32", scope="shared")
                        red = T.alloc_buffer((C,), "float32", scope="shared")
                        flags = T.alloc_buffer((3,), "int32", scope="shared")
                        ob = T.alloc_buffer((groups, DV), "float32", scope="shared")
                        lb = T.alloc_buffer((groups,), "float32", scope="shared")
                        x = T.alloc_buffer((1,), "float32", scope="local")
                        r = T.alloc_buffer((1,), "float32", scope="local")
                        need = T.alloc_buffer((1,), "int32", scope="local")
                        acc = T.alloc_buffer((ept,), "float32", scope="local")
                        lsum = T.alloc_buffer((1,), "float32", scope="local")
                        bi = blk_z // s
                        i = blk_z % s
                        kh = h // G
                        j0 = t - (c + T.int64(1)) * T.int64(C)   # first key of the chunk (may be < 0)
                        j = j0 + T.Cast("int64", tx)
                        if tx < 3:
                            flags[tx] = 0
                        for d0 in range(dq):
                            if d0 * C + tx < D:
                                qs[d0 * C + tx] = T.Cast("float32", Q[bi, h, i, d0 * C + tx]) * T.float32(scale)
                        T.tvm_storage_sync("shared")
                        x[0] = neg_inf
                        if visible(M, bi, i, j, s, t):
                            x[0] = T.float32(0)
                            for d in range(D):
                                x[0] = x[0] + qs[d] * T.Cast("float32", K[bi, kh, j, d])
                            if x[0] > T.float32(phi + high):
                                flags[0] = 1
                            if x[0] >= T.float32(phi + low):
                                flags[1] = 1
                            flags[2] = 1
                        xs[tx] = x[0]
                        red[tx] = x[0]
                        T.tvm_storage_sync("shared")
                        need[0] = T.if_then_else(T.Or(flags[0] == 1, T.And(flags[2] == 1, flags[1] == 0)), 1, 0)
                        r[0] = T.float32(phi)
                        for _ in range(need[0]):   # block-uniform: the fallback, own max
                            for it in T.unroll(LOG):
                                if tx < (C >> (it + 1)):
                                    red[tx] = T.max(red[tx], red[tx + (C >> (it + 1))])
                                T.tvm_storage_sync("shared")
                            r[0] = red[0]
                        ps[tx] = T.exp(xs[tx] - r[0])   # a hidden key: exp(-inf) = 0
                        T.tvm_storage_sync("shared")
                        grp = tx // lanes
                        lane = tx % lanes
                        lsum[0] = T.float32(0)
                        for e0 in range(ept):
                            acc[e0] = T.float32(0)
                        for jj in range(C // groups):
                            jl = jj * groups + grp
                            x[0] = ps[jl]   # in a register: TVM's sync planner refuses shared reads in conditions
                            if T.And(j0 + T.Cast("int64", jl) >= T.int64(0), x[0] > T.float32(0)):
                                lsum[0] = lsum[0] + x[0]
                                for e0 in range(ept):
                                    if e0 * lanes + lane < DV:
                                        acc[e0] = acc[e0] + x[0] * T.Cast(
                                            "float32", V[bi, kh, j0 + T.Cast("int64", jl), e0 * lanes + lane])
                        for e0 in range(ept):
                            if e0 * lanes + lane < DV:
                                ob[grp, e0 * lanes + lane] = acc[e0]
                        if lane == 0:
                            lb[grp] = lsum[0]
                        T.tvm_storage_sync("shared")
                        for e0 in range((DV + C - 1) // C):
                            if e0 * C + tx < DV:
                                acc[0] = T.float32(0)
                                for g in range(groups):
                                    acc[0] = acc[0] + ob[g, e0 * C + tx]
                                OP[bi, h, i, c, e0 * C + tx] = acc[0]
                        if tx == 0:
                            lsum[0] = T.float32(0)
                            for g in range(groups):
                                lsum[0] = lsum[0] + lb[g]
                            LP[bi, h, i, c] = lsum[0]
                            RP[bi, h, i, c] = r[0]

    @T.macro
    def combine_body(OP, LP, RP, O, b, s, t):
        for blk in T.thread_binding(b * s, thread="blockIdx.y"):
            for h in T.thread_binding(H, thread="blockIdx.x"):
                for tx in T.thread_binding(CT, thread="threadIdx.x"):
                    mx = T.alloc_buffer((1,), "float32", scope="local")
                    den = T.alloc_buffer((1,), "float32", scope="local")
                    num = T.alloc_buffer((ect,), "float32", scope="local")
                    f = T.alloc_buffer((1,), "float32", scope="local")
                    bi = blk // s
                    i = blk % s
                    nc = (t + T.int64(C - 1)) // T.int64(C)
                    mx[0] = neg_inf
                    for c in range(nc):
                        if LP[bi, h, i, c] > T.float32(0):
                            mx[0] = T.max(mx[0], RP[bi, h, i, c])
                    den[0] = T.float32(0)
                    for e0 in range(ect):
                        num[e0] = T.float32(0)
                    for c in range(nc):
                        if LP[bi, h, i, c] > T.float32(0):
                            f[0] = T.if_then_else(RP[bi, h, i, c] == mx[0], T.float32(1),
                                                  T.exp(RP[bi, h, i, c] - mx[0]))
                            den[0] = den[0] + LP[bi, h, i, c] * f[0]
                            for e0 in range(ect):
                                if e0 * CT + tx < DV:
                                    num[e0] = num[e0] + OP[bi, h, i, c, e0 * CT + tx] * f[0]
                    for e0 in range(ect):
                        if e0 * CT + tx < DV:
                            O[bi, h, i, e0 * CT + tx] = T.Cast(dtype, T.if_then_else(
                                den[0] > T.float32(0), num[e0] / den[0], T.float32(0)))

    if has_mask:
        @T.prim_func
        def decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, op_h: T.handle, lp_h: T.handle,
                   rp_h: T.handle, o_h: T.handle):
            b, s, t, sc, nc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (b, H, s, D), dtype)
            K = T.match_buffer(k_h, (b, KH, t, D), dtype)
            V = T.match_buffer(v_h, (b, KH, t, DV), dtype)
            M = T.match_buffer(m_h, (b, t), mask_dtype)
            OP = T.match_buffer(op_h, (b, H, sc, nc, DV), "float32")
            LP = T.match_buffer(lp_h, (b, H, sc, nc), "float32")
            RP = T.match_buffer(rp_h, (b, H, sc, nc), "float32")
            O = T.match_buffer(o_h, (b, H, s, DV), dtype)
            split_body(Q, K, V, M, OP, LP, RP, b, s, t)
            combine_body(OP, LP, RP, O, b, s, t)
    else:
        @T.prim_func
        def decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, op_h: T.handle, lp_h: T.handle,
                   rp_h: T.handle, o_h: T.handle):
            b, s, t, sc, nc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (b, H, s, D), dtype)
            K = T.match_buffer(k_h, (b, KH, t, D), dtype)
            V = T.match_buffer(v_h, (b, KH, t, DV), dtype)
            OP = T.match_buffer(op_h, (b, H, sc, nc, DV), "float32")
            LP = T.match_buffer(lp_h, (b, H, sc, nc), "float32")
            RP = T.match_buffer(rp_h, (b, H, sc, nc), "float32")
            O = T.match_buffer(o_h, (b, H, s, DV), dtype)
            split_body(Q, K, V, None, OP, LP, RP, b, s, t)
            combine_body(OP, LP, RP, O, b, s, t)
    return decode


# ---------------------------------------------------------------- prefill: tiled, online softmax

def _prefill(H: int, KH: int, D: int, DV: int, scale: float, causal: bool, dtype: str, mask_dtype: str | None):
    from tvm.script import tirx as T
    G = H // KH
    BR, BC = PREFILL_ROWS, PREFILL_KEYS
    has_mask = mask_dtype is not None
    visible = _visible_fn(causal, has_mask, mask_dtype)
    neg_inf = T.float32(float("-inf"))
    kload = (BC * D + BR - 1) // BR
    vload = (BC * DV + BR - 1) // BR

    @T.macro
    def body(Q, K, V, M, O, b, s, t):
        for bi in T.thread_binding(b, thread="blockIdx.z"):
            for h in T.thread_binding(H, thread="blockIdx.y"):
                for qt in T.thread_binding((s + T.int64(BR - 1)) // T.int64(BR), thread="blockIdx.x"):
                    for tx in T.thread_binding(BR, thread="threadIdx.x"):
                        ks = T.alloc_buffer((BC, D), "float32", scope="shared")
                        vs = T.alloc_buffer((BC, DV), "float32", scope="shared")
                        qr = T.alloc_buffer((D,), "float32", scope="local")
                        acc = T.alloc_buffer((DV,), "float32", scope="local")
                        sc = T.alloc_buffer((BC,), "float32", scope="local")
                        st = T.alloc_buffer((4,), "float32", scope="local")   # m, l, tile max, alpha
                        kh = h // G
                        i = qt * T.int64(BR) + T.Cast("int64", tx)
                        i_last = T.min(s, (qt + T.int64(1)) * T.int64(BR)) - T.int64(1)
                        n_tiles = (t + T.int64(BC - 1)) // T.int64(BC)
                        # tiles right of the block's last causal key hold no visible key
                        first = (s - T.int64(1) - i_last) // T.int64(BC) if causal else T.int64(0)
                        for d in T.unroll(D):
                            qr[d] = T.if_then_else(i < s, T.Cast("float32", Q[bi, h, T.min(i, s - T.int64(1)), d]),
                                                   T.float32(0)) * T.float32(scale)
                        for e in T.unroll(DV):
                            acc[e] = T.float32(0)
                        st[0] = neg_inf
                        st[1] = T.float32(0)
                        for kk in range(T.max(n_tiles - first, T.int64(0))):
                            j0 = t - (n_tiles - kk) * T.int64(BC)   # left to right, right-aligned
                            for u in range(kload):
                                if u * BR + tx < BC * D:
                                    ks[(u * BR + tx) // D, (u * BR + tx) % D] = T.if_then_else(
                                        j0 + T.Cast("int64", (u * BR + tx) // D) >= T.int64(0),
                                        T.Cast("float32", K[bi, kh, T.max(j0 + T.Cast("int64", (u * BR + tx) // D),
                                                                          T.int64(0)), (u * BR + tx) % D]),
                                        T.float32(0))
                            for u in range(vload):
                                if u * BR + tx < BC * DV:
                                    vs[(u * BR + tx) // DV, (u * BR + tx) % DV] = T.if_then_else(
                                        j0 + T.Cast("int64", (u * BR + tx) // DV) >= T.int64(0),
                                        T.Cast("float32", V[bi, kh, T.max(j0 + T.Cast("int64", (u * BR + tx) // DV),
                                                                          T.int64(0)), (u * BR + tx) % DV]),
                                        T.float32(0))
                            T.tvm_storage_sync("shared")
                            st[2] = neg_inf
                            for cc in T.unroll(BC):
                                sc[cc] = neg_inf
                                if T.And(i < s, visible(M, bi, i, j0 + T.int64(cc), s, t)):
                                    sc[cc] = T.float32(0)
                                    for d in T.unroll(D):
                                        sc[cc] = sc[cc] + qr[d] * ks[cc, d]
                                st[2] = T.max(st[2], sc[cc])
                            if st[2] > neg_inf:   # a tile with no visible key changes nothing
                                st[2] = T.max(st[0], st[2])
                                st[3] = T.if_then_else(st[0] > neg_inf, T.exp(st[0] - st[2]), T.float32(0))
                                st[1] = st[1] * st[3]
                                for e in T.unroll(DV):
                                    acc[e] = acc[e] * st[3]
                                for cc in T.unroll(BC):
                                    sc[cc] = T.exp(sc[cc] - st[2])
                                    st[1] = st[1] + sc[cc]
                                    for e in T.unroll(DV):
                                        acc[e] = acc[e] + sc[cc] * vs[cc, e]
                                st[0] = st[2]
                            T.tvm_storage_sync("shared")
                        if i < s:
                            for e in T.unroll(DV):
                                O[bi, h, i, e] = T.Cast(dtype, T.if_then_else(st[1] > T.float32(0), acc[e] / st[1],
                                                                              T.float32(0)))

    if has_mask:
        @T.prim_func
        def prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, op_h: T.handle, lp_h: T.handle,
                    rp_h: T.handle, o_h: T.handle):
            b, s, t, sc, nc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (b, H, s, D), dtype)
            K = T.match_buffer(k_h, (b, KH, t, D), dtype)
            V = T.match_buffer(v_h, (b, KH, t, DV), dtype)
            M = T.match_buffer(m_h, (b, t), mask_dtype)
            OP = T.match_buffer(op_h, (b, H, sc, nc, DV), "float32")
            LP = T.match_buffer(lp_h, (b, H, sc, nc), "float32")
            RP = T.match_buffer(rp_h, (b, H, sc, nc), "float32")
            O = T.match_buffer(o_h, (b, H, s, DV), dtype)
            body(Q, K, V, M, O, b, s, t)
    else:
        @T.prim_func
        def prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, op_h: T.handle, lp_h: T.handle,
                    rp_h: T.handle, o_h: T.handle):
            b, s, t, sc, nc = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            Q = T.match_buffer(q_h, (b, H, s, D), dtype)
            K = T.match_buffer(k_h, (b, KH, t, D), dtype)
            V = T.match_buffer(v_h, (b, KH, t, DV), dtype)
            OP = T.match_buffer(op_h, (b, H, sc, nc, DV), "float32")
            LP = T.match_buffer(lp_h, (b, H, sc, nc), "float32")
            RP = T.match_buffer(rp_h, (b, H, sc, nc), "float32")
            O = T.match_buffer(o_h, (b, H, s, DV), dtype)
            body(Q, K, V, None, O, b, s, t)
    return prefill
