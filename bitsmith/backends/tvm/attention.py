"""The ``attention`` kernel: causal grouped-query attention over the KV cache.

q [b, h, s, d], k [b, kvh, t, d], v [b, kvh, t, dv] -> o [b, h, s, dv], where t = past + s and
query row i sits at absolute position t - s + i, so it may read keys j <= i + (t - s)
(``causal_attention`` in ``bitsmith/ir/interpreter.py``). Query head h reads kv head
h // (h / kvh). Scores, max and sum are kept in float32 (float16 inputs are widened).
With ``mask_dtype``, a 4th input mask [b, t] (nonzero = attend) hides keys per batch row; a
query row that sees no key gives zeros.

The reductions over the key axis (max, sum, weighted sum) run in one fixed order over j, and
a hidden key contributes an exact 0 (exp(-inf)): so a row's result does not depend on how
many hidden (padding) keys its batch adds, which is what makes decode batch-invariant
(docs/ragged-batches.md).

With ``capacity`` (the in-place KV cache, ``kv_inplace.py``) k and v are capacity-sized caches
[b, kvh, C, d] of which only the first t slots are live, t being the mask's length [b, t]:
the kernel reads slots [0, t) in the same order as the compact kernel reads its t keys, so
both give the same bits.
"""

from __future__ import annotations

from tvm import te, tirx

from .kernel import KernelDef, Recipe


def attention_kernel(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float, causal: bool,
                     dtype: str, mask_dtype: str | None = None, capacity: bool = False,
                     kv_dtype: str | None = None) -> KernelDef:
    """The kernel (built from a ``Recipe`` of ``attention_func``: its TIR is made only when needed).
    ``kv_dtype``: keys and values stored in another float type than q (the in-place cache's
    ``kv_dtype`` option, float16), widened to the accumulation type when read."""
    if capacity and mask_dtype is None:
        raise ValueError("a capacity-sized KV cache needs the mask: its length is the live length")
    kv_dtype = None if kv_dtype in (None, dtype) else str(kv_dtype)
    args = (int(heads), int(kv_heads), int(head_dim), int(value_dim), float(scale), bool(causal), str(dtype),
            None if mask_dtype is None else str(mask_dtype), bool(capacity)) + ((kv_dtype,) if kv_dtype else ())
    name = (f"attention_h{heads}_kv{kv_heads}_d{head_dim}_{dtype}{'_causal' if causal else ''}"
            f"{'_mask_' + mask_dtype if mask_dtype else ''}{'_kvcap' if capacity else ''}"
            f"{'_kv_' + kv_dtype if kv_dtype else ''}")
    return KernelDef(name, Recipe(attention_func, args), "attention")


def attention_func(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float, causal: bool,
                   dtype: str, mask_dtype: str | None, capacity: bool, kv_dtype: str | None = None) -> tirx.PrimFunc:
    b, s, t = (tirx.Var(n, "int64") for n in ("batch", "seq", "kv_len"))
    cap = tirx.Var("kv_capacity", "int64") if capacity else t
    g = heads // kv_heads
    acc = "float32" if dtype == "float16" else dtype
    q = te.placeholder((b, heads, s, head_dim), dtype, name="q")
    k = te.placeholder((b, kv_heads, cap, head_dim), kv_dtype or dtype, name="k")
    v = te.placeholder((b, kv_heads, cap, value_dim), kv_dtype or dtype, name="v")
    mask = te.placeholder((b, t), mask_dtype, name="mask") if mask_dtype else None
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
        visible = []
        if causal:
            visible.append(j <= i + (t - s))
        if mask is not None:
            m = mask[bi, j]  # a bool mask is the condition itself (LLVM has no compare on i1 here)
            visible.append(m if mask_dtype == "bool" else m != tirx.const(0, mask_dtype))
        if not visible:
            return sc
        return tirx.Select(visible[0] if len(visible) == 1 else tirx.all(*visible), sc, neg_inf)

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

    def normalised(bi, hi, i, e):
        ratio = num[bi, hi, i, e] / den[bi, hi, i]
        if mask is None:  # the causal diagonal is always visible: den >= 1
            return tirx.Cast(dtype, ratio)
        return tirx.Cast(dtype, tirx.Select(den[bi, hi, i] > tirx.const(0.0, acc), ratio, tirx.const(0.0, acc)))

    out = te.compute((b, heads, s, value_dim), normalised, name="out")
    return te.create_prim_func([q, k, v] + ([mask] if mask is not None else []) + [out])


def embedding_kernel(vocab: int, dim: int, id_dtype: str, dtype: str) -> KernelDef:
    """rows[n, dim] = table[ids[n]]; ids are range-checked by the executor before the call."""
    return KernelDef(f"embedding_{vocab}x{dim}_{dtype}", Recipe(embedding_func, (int(vocab), int(dim), str(id_dtype),
                                                                                  str(dtype))), "injective")


def embedding_func(vocab: int, dim: int, id_dtype: str, dtype: str) -> tirx.PrimFunc:
    n = tirx.Var("n", "int64")
    table = te.placeholder((vocab, dim), dtype, name="table")
    ids = te.placeholder((n,), id_dtype, name="ids")
    out = te.compute((n, dim), lambda i, j: table[tirx.Cast("int64", ids[i]), j], name="rows")
    return te.create_prim_func([table, ids, out])
