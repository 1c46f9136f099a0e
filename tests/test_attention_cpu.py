"""The hand-vectorized CPU attention kernel (``backends/tvm/attention_cpu.py``) against a float64
numpy oracle of the ``attention`` op, plus the exact properties the decode path relies on.

Tolerance (float32 arithmetic against float64): a score q.k * scale carries at most ~d rounding
errors of its largest product, eps * d * scale * max|q| * max|k|; exp adds ~2 ulp (Cephes expf;
measured separately below) and passes a score error through unchanged in relative terms; the
output is a convex combination of value rows, so its error is at most max|v| times twice the
probability error plus one rounding per key of the running sums. Float16 inputs add the output's
own rounding (2^-11 relative). Measured errors sit ~10x inside this bound.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from bitsmith.backends.tvm.attention import attention_kernel  # noqa: E402
from bitsmith.backends.tvm.attention_cpu import EXP_FLOOR, vexp  # noqa: E402
from bitsmith.backends.tvm.matmul import host_target  # noqa: E402
from bitsmith.backends.tvm.schedule_cpu import describe_cpu_schedule, schedule_cpu  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=None)
def kernel(heads, kv_heads, d, dv, causal, dtype, mask_dtype, capacity):
    kdef = attention_kernel(heads, kv_heads, d, dv, d ** -0.5, causal, dtype, mask_dtype, capacity)
    assert describe_cpu_schedule(kdef) == "attention-gqa-vector"
    target = host_target()
    return tvm.compile(schedule_cpu(kdef, target), target=target)["main"]


def run(fn, q, k, v, mask, out_dtype):
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (q, k, v) + (() if mask is None else (mask,))]
    out = tvm.runtime.tensor(np.zeros(q.shape[:3] + (v.shape[3],), out_dtype), dev)
    fn(*args, out)
    return out.numpy()


def oracle(q, k, v, mask, causal, t):
    """float64 attention over the first t keys: causal (query i at position t - s + i), mask zero
    hides a key, a row that sees no key gives zeros."""
    b, h, s, d = q.shape
    g = h // k.shape[1]
    q, k, v = (x.astype(np.float64) for x in (q, k[:, :, :t], v[:, :, :t]))
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    sc = np.einsum("bhid,bhjd->bhij", q, k) * d ** -0.5
    visible = np.ones((b, 1, s, t), bool)
    if causal:
        visible &= (np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s))[None, None]
    if mask is not None:
        visible &= (mask != 0)[:, None, None, :]
    sc = np.where(visible, sc, -np.inf)
    m = sc.max(-1, keepdims=True)
    p = np.exp(sc - np.where(np.isfinite(m), m, 0))
    den = p.sum(-1, keepdims=True)
    return np.where(den > 0, np.einsum("bhij,bhje->bhie", p, v) / np.where(den > 0, den, 1), 0), sc


@HYP
@given(b=st.integers(1, 2), kvh=st.sampled_from([1, 3]), group=st.sampled_from([1, 3, 4]),
       d=st.sampled_from([16, 64]), dv=st.sampled_from([16, 32]), t=st.integers(1, 70), s=st.integers(1, 5),
       causal=st.booleans(), mask_kind=st.sampled_from([None, "int64", "bool"]), extra=st.integers(0, 5),
       dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_matches_float64_oracle(b, kvh, group, d, dv, t, s, causal, mask_kind, extra, dtype, seed):
    s = min(s, t)
    rng = np.random.default_rng(seed)
    h = kvh * group
    cap = t + (extra if mask_kind else 0)  # the capacity form only exists with a mask (its length is t)
    q = rng.standard_normal((b, h, s, d)).astype(dtype)
    k = rng.standard_normal((b, kvh, cap, d)).astype(dtype) * 2
    v = rng.standard_normal((b, kvh, cap, dv)).astype(dtype)
    mask = None
    if mask_kind:
        mask = (rng.random((b, t)) < 0.7).astype(mask_kind)
        mask[0, : rng.integers(0, t + 1)] = 0  # a left-padded row; may hide every key
    got = run(kernel(h, kvh, d, dv, causal, dtype, mask_kind, bool(mask_kind and extra)), q, k, v, mask, dtype).astype(np.float64)
    want, sc = oracle(q, k, v, mask, causal, t)
    vmax = float(np.abs(v[:, :, :t]).max())
    score_err = EPS32 * d * d ** -0.5 * float(np.abs(q).max()) * float(np.abs(k).max())
    tol = vmax * (2 * (score_err + 4 * EPS32) + (t + 8) * EPS32) + (vmax * 2.0 ** -11 if dtype == "float16" else 0)
    err = np.abs(got - want).max()
    assert err <= tol, (err, tol)


def test_capacity_slots_past_the_live_length_are_never_read():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 6, 3, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 40, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 40, 32)).astype(np.float32)
    mask = np.ones((2, 29), np.int64)
    compact = run(kernel(6, 2, 64, 32, True, "float32", "int64", False), q, k[:, :, :29], v[:, :, :29], mask, np.float32)
    k[:, :, 29:], v[:, :, 29:] = np.nan, np.nan
    capacity = run(kernel(6, 2, 64, 32, True, "float32", "int64", True), q, k, v, mask, np.float32)
    assert np.array_equal(compact, capacity)


@pytest.mark.parametrize("pad", [1, 5, 16, 17])
def test_padding_keys_do_not_change_a_row(pad):
    """Left padding (hidden keys before the prompt) leaves the row's bits unchanged: the decode
    batch-invariance the sums over keys in key order give (docs/ragged-batches.md)."""
    rng = np.random.default_rng(pad)
    t = 37
    q = rng.standard_normal((1, 9, 1, 64)).astype(np.float32)
    k = rng.standard_normal((1, 3, t, 64)).astype(np.float32)
    v = rng.standard_normal((1, 3, t, 64)).astype(np.float32)
    fn = kernel(9, 3, 64, 64, True, "float32", "int64", True)
    alone = run(fn, q, k, v, np.ones((1, t), np.int64), np.float32)
    kp = np.concatenate([rng.standard_normal((1, 3, pad, 64)).astype(np.float32), k], axis=2)
    vp = np.concatenate([rng.standard_normal((1, 3, pad, 64)).astype(np.float32), v], axis=2)
    mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, t), np.int64)], axis=1)
    assert np.array_equal(run(fn, q, kp, vp, mask, np.float32), alone)


def test_vector_exp_within_two_ulp_and_exactly_zero_below_the_floor():
    from tvm.script import tirx as T
    n = 4096

    @T.prim_func(s_tir=True)
    def main(xh: T.handle, yh: T.handle):
        x = T.match_buffer(xh, (n,), "float32")
        y = T.match_buffer(yh, (n,), "float32")
        for c in range(n // 16):
            y[T.Ramp(c * 16, 1, 16)] = vexp(x[T.Ramp(c * 16, 1, 16)])

    fn = tvm.compile(tvm.IRModule({"main": main}), target=host_target())["main"]
    x = np.concatenate([-np.logspace(-8, np.log10(87.3), n - 8), [0.0, -0.0, -1e-30, EXP_FLOOR, -87.4, -100.0,
                                                                  -np.inf, -3.4e38]]).astype(np.float32)
    y = tvm.runtime.tensor(np.empty(n, np.float32))
    fn(tvm.runtime.tensor(x), y)
    got = y.numpy()
    want = np.exp(x.astype(np.float64))
    normal = x >= EXP_FLOOR
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert np.abs(got[normal] - want[normal]).max() / 1 <= 2 * ulp.max()
    assert (np.abs(got[normal] - want[normal]) <= 2 * ulp).all()
    assert (got[~normal] == 0).all()

