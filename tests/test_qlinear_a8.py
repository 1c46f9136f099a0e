"""tvm-llvm ``activation_bits=8`` (W4A8, ``backends/tvm/qlinear_a8.py``).

Oracle for the kernel: a numpy simulation of the same arithmetic (activations quantized per
group of 32 as ``round_half_even(x * (127 / max|x|))`` in float32, exact integer dot products,
the group terms combined in float64). The integer parts match exactly, so the kernel and the
simulation differ only by float32 rounding of the combination: at most (groups + 8) roundings
of the sum of |w q| terms (the kernel scales per-lane partial sums of a group, which the group's
sum of absolute products bounds; a seed where the signed total cancelled failed a bound on it). That bound is ~1e-6 of the output where the quantization
itself moves it by ~1e-2: a kernel computing float activations (or wrong codes, scales, group
order) fails it. Whole models: the target's declared tolerance for the option (8% of
max|logit|; measured 1.8% on the random two-layer Llama here, 4.1% on SmolLM2).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from bitsmith.backends.tvm.matmul import host_target  # noqa: E402
from qlinear_cases import run_kernel as run  # noqa: E402
from bitsmith.backends.tvm.matmul_cpu import _has  # noqa: E402
from bitsmith.backends.tvm.qlinear_a8 import applies, qlinear_a8_kernel  # noqa: E402
from bitsmith.backends.tvm.qlinear_layout import QLinearLayout, pack_sliced  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def layout(n, k, offsets, bias, scale_dtype, low=0, bits=4):
    return QLinearLayout(in_features=k, out_features=n, group_size=32, scheme="gguf-test", bits=bits, kept=k,
                         groups=k // 32, asymmetric=False, candidates=1, has_selectors=False, nm=None, nm_width=0,
                         outlier_width=0, has_bias=bias, affine=True, grid_low=low, offsets=offsets,
                         scale_dtype=scale_dtype)


@functools.lru_cache(maxsize=None)
def kernel(n, k, offsets, bias, scale_dtype, low, vnni, bits=4):
    lay = layout(n, k, offsets, bias, scale_dtype, low, bits)
    shapes = [((n, k * bits // 8), "uint8"), ((n, k // 32), scale_dtype)] + ([((n, k // 32), scale_dtype)] if offsets else [])
    shapes += [((n,), "float32")] if bias else []
    target = host_target()
    return tvm.compile(tvm.IRModule({"main": qlinear_a8_kernel(lay, shapes, "float32", vnni).with_attr(
        "global_symbol", "main")}), target=target)["main"]


def simulate(x, codes, s, o, bias, low):
    """y (float64) and a bound on |terms| (for the rounding tolerance)."""
    m, k = x.shape
    g = k // 32
    xg = x.reshape(m, g, 32)
    amax = np.abs(xg).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    dx = (amax / np.float32(127)).astype(np.float32)
    q = np.rint(xg * inv[..., None]).astype(np.int64)
    w = codes.reshape(-1, g, 32).astype(np.int64) + low
    isum = np.einsum("ngk,mgk->mng", w, q)  # exact
    s64, xs = s.astype(np.float64), dx.astype(np.float64) * q.sum(-1)
    coef = o.astype(np.float64) if o is not None else np.zeros_like(s64)
    t1 = isum * s64[None] * dx[:, None, :]
    t2 = coef[None] * xs[:, None, :]
    y = t1.sum(-1) + t2.sum(-1) + (bias[None].astype(np.float64) if bias is not None else 0)
    # the kernel scales partial sums of each group (int32 lanes) before adding them: a partial
    # sum is at most the group's sum of |w q|, not its (possibly cancelling) total
    partial = np.einsum("ngk,mgk->mng", np.abs(w), np.abs(q)) * np.abs(s64)[None] * dx[:, None, :]
    size = partial.sum(-1) + np.abs(t2).sum(-1) + (np.abs(bias)[None] if bias is not None else 0)
    return y, (g + 8) * EPS32 * size


@HYP
@given(n=st.integers(1, 21), pairs=st.sampled_from([1, 2, 9]), m=st.integers(1, 10), offsets=st.booleans(),
       bias=st.booleans(), scale_dtype=st.sampled_from(["float16", "float32"]), low=st.sampled_from([0, -8]),
       bits=st.sampled_from([4, 8]), zero_group=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_equals_the_w4a8_simulation(n, pairs, m, offsets, bias, scale_dtype, low, bits, zero_group, seed):
    """n covers the 4-row steps and their leftovers, m the 4-row activation tiles and singles,
    9 pairs (SmolLM2's 576) the offset term's 16-group vectors plus scalar groups; 8-bit codes
    are GGUF Q8_0's (int8 values as codes - 128, no offsets), extremes -128 and 127 included."""
    rng = np.random.default_rng(seed)
    k = 64 * pairs
    if bits == 8:
        offsets, low = False, -128
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    codes[0, :2] = (0, (1 << bits) - 1)
    s = (rng.random((n, k // 32)) * 0.05).astype(scale_dtype)
    o = (rng.standard_normal((n, k // 32)) * 0.1).astype(scale_dtype) if offsets else None
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    if zero_group:
        x[0, :32] = 0  # an all-zero group: scale 0, every code times 0
    ops = [pack_sliced(codes, bits), s] + ([o] if offsets else []) + ([b] if bias else [])
    got = run(kernel(n, k, offsets, bias, scale_dtype, low, False, bits), x, ops, n)
    want, tol = simulate(x, codes, s, o, b, low)
    assert (np.abs(got - want) <= tol + 1e-30).all(), np.abs(got - want).max()
    # and it is the int8 computation, not the float one: the float result is farther away
    w = codes.reshape(n, -1, 32).astype(np.float64) + low
    dense = (w * s.astype(np.float64)[..., None] + (o.astype(np.float64)[..., None] if offsets else 0)).reshape(n, k)
    float_y = x.astype(np.float64) @ dense.T + (b if bias else 0)
    if np.abs(float_y - want).max() > 100 * tol.max():
        assert np.abs(got - float_y).max() > 10 * tol.max()


@pytest.mark.skipif(not (_has(host_target(), "avx512vnni") and _has(host_target(), "avx512vl")),
                    reason="this CPU has no AVX-512 VNNI: only the AVX2 path (pmaddubsw) runs here")
def test_vnni_and_avx2_paths_give_the_same_bits():
    rng = np.random.default_rng(3)
    n, k = 13, 576
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = (rng.random((n, k // 32)) * 0.05).astype(np.float16)
    o = (rng.standard_normal((n, k // 32)) * 0.1).astype(np.float16)
    x = rng.standard_normal((5, k)).astype(np.float32)
    ops = [pack_sliced(codes, 4), s, o]
    a = run(kernel(n, k, True, False, "float16", 0, True), x, ops, n)
    b = run(kernel(n, k, True, False, "float16", 0, False), x, ops, n)
    assert np.array_equal(a, b)
    codes8 = rng.integers(0, 256, (n, k)).astype(np.uint8)
    ops8 = [pack_sliced(codes8, 8), s]
    a8 = run(kernel(n, k, False, False, "float16", -128, True, 8), x, ops8, n)
    assert np.array_equal(a8, run(kernel(n, k, False, False, "float16", -128, False, 8), x, ops8, n))


def test_applies_names_what_it_does_not_cover():
    assert applies(layout(8, 576, True, False, "float16")) is None
    assert "groups of 32" in applies(QLinearLayout(**{**layout(8, 576, True, False, "float16").__dict__,
                                                     "group_size": 64}))
    assert "in_features" in applies(layout(8, 96, True, False, "float16"))
    assert applies(layout(8, 576, False, False, "float16", -128, 8)) is None  # Q8_0
    assert "affine 4-bit" in applies(layout(8, 576, False, False, "float16", 0, 8))  # 8-bit codes, low 0
    assert "affine 4-bit" in applies(layout(8, 576, False, False, "float16", 0, 5))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_files import write_tiny_llama
    return write_tiny_llama(tmp_path_factory.mktemp("a8") / "tiny.gguf",
                            {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_1",
                             "ffn_gate": "Q8_0", "ffn_up": "Q4_1", "ffn_down": "Q4_1"})


def test_option_runs_gguf_q4_layers_in_int8_within_tolerance(tiny_gguf, tmp_path, monkeypatch):
    import bitsmith
    from bitsmith.backends import backend_for_target
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path))
    ids = np.array([[0, 5, 9, 33, 12, 7, 40, 2]])
    ref = np.asarray(bitsmith.compile(str(tiny_gguf), target="reference", quant="gguf")(ids))
    fp = bitsmith.compile(str(tiny_gguf), target="tvm-llvm", quant="gguf")
    a8 = bitsmith.compile(str(tiny_gguf), target="tvm-llvm", quant="gguf", activation_bits=8)
    schedules = [v["schedule"] for v in a8.report()["executable"]["kernel_schedules"].values()]
    assert schedules.count("vector-qlinear-a8") >= 6  # Q4_0 / Q4_1 and Q8_0 layers
    assert a8.report()["executable"]["activation_bits"] == 8
    got = np.asarray(a8(ids))
    tol = backend_for_target("tvm-llvm").tolerance("tvm-llvm", a8.options)
    assert tol.mismatch(got, ref) is None, tol.mismatch(got, ref)
    assert not np.array_equal(got, np.asarray(fp(ids)))  # the option changed the arithmetic
    path = tmp_path / "a8"
    a8.save(path)
    loaded = bitsmith.load(path)
    assert np.array_equal(np.asarray(loaded(ids)), got)
    assert loaded.report()["executable"]["activation_bits"] == 8  # read back from the kernels' schedules


def test_bad_activation_bits_is_refused(tiny_gguf):
    import bitsmith
    from bitsmith.errors import OptionError
    with pytest.raises(OptionError, match="activation_bits must be one of"):
        bitsmith.compile(str(tiny_gguf), target="tvm-llvm", quant="gguf", activation_bits=4)


def test_a_cpu_without_integer_dots_is_refused_by_name(tiny_gguf, tmp_path, monkeypatch):
    import bitsmith
    from bitsmith.errors import BitsmithError
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path))
    with pytest.raises(BitsmithError, match="activation_bits=8 needs integer dot instructions.*x86-64 has neither"):
        bitsmith.compile(str(tiny_gguf), target="tvm-llvm", quant="gguf", activation_bits=8, mcpu="x86-64")
