"""The ``attention`` kernel: causal grouped-query attention over the KV cache.

q [b, h, s, d], k [b, kvh, t, d], v [b, kvh, t, dv] -> o [b, h, s, dv], where t = past + s and
query row i sits at absolute position t - s + i, so it may read keys j <= i + (t - s)
(``causal_attention`` in ``bitsmith/ir/interpreter.py``). Query head h reads kv head
h // (h / kvh). Scores, max and sum are kept in float32 (float16 inputs are widened).
"""

from __future__ import annotations

from tvm import te, tirx

from .kernel import KernelDef


def attention_kernel(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float, causal: bool,
                     dtype: str) -> KernelDef:
    b, s, t = (tirx.Var(n, "int64") for n in ("batch", "seq", "kv_len"))
    g = heads // kv_heads
    acc = "float32" if dtype == "float16" else dtype
    q = te.placeholder((b, heads, s, head_dim), dtype, name="q")
    k = te.placeholder((b, kv_heads, t, head_dim), dtype, name="k")
    v = te.placeholder((b, kv_heads, t, value_dim), dtype, name="v")
    # q.k in LANES independent partial sums (a spatial axis the schedule vectorises; a plain
    # float reduction would stay scalar without fast-math reassociation), then summed
    lanes = next(n for n in (16, 8, 4, 2, 1) if head_dim % n == 0)
    rd = te.reduce_axis((0, head_dim // lanes), name="rd")
    neg_inf = tirx.const(float("-inf"), acc)
    part = te.compute((b, heads, s, t, lanes),
                      lambda bi, hi, i, j, l: te.sum(tirx.Cast(acc, q[bi, hi, i, rd * lanes + l])
                                                     * tirx.Cast(acc, k[bi, hi // g, j, rd * lanes + l]), axis=rd),
                      name="partial")
    rl = te.reduce_axis((0, lanes), name="rl")
    scores = te.compute((b, heads, s, t), lambda bi, hi, i, j: te.sum(part[bi, hi, i, j, rl], axis=rl), name="scores")

    def masked(bi, hi, i, j):
        sc = scores[bi, hi, i, j] * tirx.const(scale, acc)
        if not causal:
            return sc
        return tirx.Select(j <= i + (t - s), sc, neg_inf)

    rj = te.reduce_axis((0, t), name="rj")
    mx = te.compute((b, heads, s), lambda bi, hi, i: te.max(masked(bi, hi, i, rj), axis=rj), name="row_max")

    def shifted(bi, hi, i, j):
        m = mx[bi, hi, i]
        m = tirx.Select(tirx.isfinite(m), m, tirx.const(0.0, acc))
        return tirx.exp(masked(bi, hi, i, j) - m)

    p = te.compute((b, heads, s, t), shifted, name="probs")
    rs = te.reduce_axis((0, t), name="rs")
    den = te.compute((b, heads, s), lambda bi, hi, i: te.sum(p[bi, hi, i, rs], axis=rs), name="row_sum")
    rv = te.reduce_axis((0, t), name="rv")
    num = te.compute((b, heads, s, value_dim),
                     lambda bi, hi, i, e: te.sum(p[bi, hi, i, rv] * tirx.Cast(acc, v[bi, hi // g, rv, e]), axis=rv),
                     name="weighted")
    out = te.compute((b, heads, s, value_dim),
                     lambda bi, hi, i, e: tirx.Cast(dtype, num[bi, hi, i, e] / den[bi, hi, i]), name="out")
    func = te.create_prim_func([q, k, v, out])
    name = f"attention_h{heads}_kv{kv_heads}_d{head_dim}_{dtype}{'_causal' if causal else ''}"
    return KernelDef(name, func, "attention")


def embedding_kernel(vocab: int, dim: int, id_dtype: str, dtype: str) -> KernelDef:
    """rows[n, dim] = table[ids[n]]; ids are range-checked by the executor before the call."""
    n = tirx.Var("n", "int64")
    table = te.placeholder((vocab, dim), dtype, name="table")
    ids = te.placeholder((n,), id_dtype, name="ids")
    out = te.compute((n, dim), lambda i, j: table[tirx.Cast("int64", ids[i]), j], name="rows")
    return KernelDef(f"embedding_{vocab}x{dim}_{dtype}", te.create_prim_func([table, ids, out]), "injective")
