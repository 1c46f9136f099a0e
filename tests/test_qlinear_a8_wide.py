"""tvm-llvm ``activation_bits=8`` on codes in wide groups (``backends/tvm/qlinear_a8_wide.py``).

Oracle for the kernel: a numpy simulation of the same arithmetic (activations quantized per
weight group as ``round_half_even(x * (127 / max|x|))`` in float32, exact integer dot products
of the integer weights (``code - zero point``, or the group's grid value) and those integers,
the group terms combined in float64), as
in tests/test_qlinear_a8.py: the integer parts match exactly, so the kernel and the simulation
differ only by float32 rounding of the combination, at most (groups + 8) roundings of the sum of
the absolute terms (the kernel scales per-lane partial sums of what its dots see, codes or grid
values + 64, which the group's sum of those |c q| bounds, and adds a zero-point term per group). That is ~1e-6 of the output where the activation rounding moves it by ~1e-2: a
kernel on float activations, or with a wrong code, zero point, group or activation position,
fails it. Whole models: the target's declared tolerance for the option on these schemes (18% of
max|logit|: SmolLM2 moved 8.2-8.7%, this file's tiny Llama 0.5-0.7%).
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
from bitsmith.backends.tvm.qlinear_a8_wide import applies, chunk, position, qlinear_a8_wide_kernel  # noqa: E402
from bitsmith.backends.tvm.qlinear_blocks import TABLE_BIAS  # noqa: E402
from bitsmith.backends.tvm.qlinear_layout import QLinearLayout, grid_table, pack_sliced, unpack_sliced  # noqa: E402
from bitsmith.ir.quant_grids import get_scheme  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VNNI = _has(host_target(), "avx512vnni") and _has(host_target(), "avx512vl")
ZMM = VNNI and _has(host_target(), "avx512bw")  # the kernel's two-rows-per-zmm decode path


SCHEMES = ("rtn-int2", "rtn-int3", "rtn-int4", "rtn-int8", "rtn-int2-sym", "fp3", "bitmod-w3", "bitmod-w4")


def layout(n, k, g, scheme_name, bias=False, **changes):
    sch = get_scheme(scheme_name)
    lay = QLinearLayout(in_features=k, out_features=n, group_size=g, scheme=scheme_name, bits=sch.bits, kept=k,
                        groups=-(-k // g), asymmetric=sch.asymmetric,
                        candidates=0 if sch.asymmetric else len(sch.candidates),
                        has_selectors=bool(sch.selector_bits), nm=None, nm_width=0, outlier_width=0, has_bias=bias,
                        affine=False, grid_low=0, offsets=False, scale_dtype="float16")
    return QLinearLayout(**{**lay.__dict__, **changes})


@functools.lru_cache(maxsize=None)
def kernel(n, k, g, scheme, bias, vnni, shapes, zmm=False):
    func = qlinear_a8_wide_kernel(layout(n, k, g, scheme, bias), list(shapes), "float32", vnni, zmm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=host_target())["main"]


def operands(rng, n, k, g, scheme, bias):
    """(integer weight values [n, k], scales, bias, the kernel's operands, per weight (the value the
    kernel's dot sees, its zero-point coefficient per group))."""
    sch = get_scheme(scheme)
    groups, bits = -(-k // g), sch.bits
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    codes[0, :2] = (0, (1 << bits) - 1)  # both extremes
    s = (rng.random((n, groups)) * 0.05).astype(np.float16)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    streams = [pack_sliced(codes & 3, 2), pack_sliced(codes >> 2, 1)] if bits == 3 else [pack_sliced(codes, bits)]
    col_group = np.arange(k) // g
    if sch.asymmetric:
        z = rng.integers(0, 1 << bits, (n, groups)).astype(np.uint8)
        values = codes.astype(np.int64) - z[:, col_group]
        shift = 128 if bits == 8 else 0
        seen, coef = np.abs(codes.astype(np.int64) - shift), np.abs(shift - z.astype(np.int64))
        ops = streams + [s, z]
    else:
        grid = grid_table(sch)
        sel = rng.integers(0, len(sch.candidates), (n, groups)).astype(np.uint8)
        values = grid[sel[:, col_group], codes].astype(np.int64)
        seen, coef = values + TABLE_BIAS, np.full((n, groups), TABLE_BIAS)
        ops = streams + [s, grid] + ([sel] if sch.selector_bits else [])
    return values, s, b, ops + ([b] if bias else []), (seen, coef)


def simulate(x, values, s, bias, g, bound_terms):
    """y (float64) and a bound on its float32 rounding (module doc)."""
    m, k = x.shape
    groups = -(-k // g)
    pad = groups * g - k  # a shorter last group: zero activations add nothing

    def grouped(a):
        return np.concatenate([a, np.zeros((len(a), pad), a.dtype)], 1).reshape(len(a), groups, g)

    xg = grouped(x)
    amax = np.abs(xg).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    dx = (amax / np.float32(127)).astype(np.float32)
    q = np.rint(xg * inv[..., None]).astype(np.int64)
    isum = np.einsum("ngk,mgk->mng", grouped(values), q)  # exact
    s64 = s.astype(np.float64)
    y = (isum * s64[None] * dx[:, None, :]).sum(-1) + (bias[None].astype(np.float64) if bias is not None else 0)
    # the kernel scales partial sums of what its dots see (codes, codes - 128, grid values + 64)
    # and adds each group's zero-point term: both bounded by their absolute sums
    seen, coef = bound_terms
    xs = dx.astype(np.float64) * np.abs(q).sum(-1)
    size = (np.einsum("ngk,mgk->mng", grouped(seen), np.abs(q)) * s64[None] * dx[:, None, :]).sum(-1)
    size += (coef[None] * s64[None] * xs[:, None, :]).sum(-1) + (np.abs(bias)[None] if bias is not None else 0)
    return y, (groups + 8) * EPS32 * size


def shapes_of(ops):
    return tuple((a.shape, str(a.dtype)) for a in ops)


@HYP
@given(scheme=st.sampled_from(SCHEMES), n=st.integers(1, 21), m=st.integers(1, 10), units=st.integers(1, 3),
       tail=st.integers(0, 5), bias=st.booleans(), zero_group=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_equals_the_simulation(scheme, n, m, units, tail, bias, zero_group, seed):
    """Every kind of layout it covers (zero points at 2/3/4/8 bits, grid tables with and without
    selectors); groups of 1-3 loads of 32 code bytes, and a shorter last group of 0 to
    2 * units - 1 chunks (whole loads and/or a 16-byte half: 576 = 4 x 128 + 64, SmolLM2's width,
    has a one-chunk last group at 2 and 3 bits); n covers the 4-row steps and their leftovers, m
    the 4-row activation tiles and singles."""
    rng = np.random.default_rng(seed)
    bits = get_scheme(scheme).bits
    g = units * 2 * chunk(bits)
    k = 2 * g + tail % (2 * units) * chunk(bits)
    values, s, b, ops, bound_terms = operands(rng, n, k, g, scheme, bias)
    x = (rng.standard_normal((m, k)) * rng.choice([0.01, 1.0, 30.0])).astype(np.float32)
    if zero_group:
        x[0, :g] = 0  # an all-zero group: step 0, every code times 0
    got = run(kernel(n, k, g, scheme, bias, VNNI, shapes_of(ops), ZMM), x, ops, n)
    want, tol = simulate(x, values, s, b, g, bound_terms)
    assert (np.abs(got - want) <= tol + 1e-30).all(), np.abs(got - want).max()
    # and it is the int8 computation, not the float one: the float result is farther away
    dense = values.astype(np.float64) * np.repeat(s.astype(np.float64), g, 1)[:, :k]
    float_y = x.astype(np.float64) @ dense.T + (b if bias else 0)
    if np.abs(float_y - want).max() > 100 * tol.max():
        assert np.abs(got - float_y).max() > 10 * tol.max()


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: only the AVX2 path (pmaddubsw) runs here")
@pytest.mark.parametrize("scheme", ["rtn-int2", "rtn-int8", "bitmod-w3", "bitmod-w4"])
def test_vnni_and_avx2_paths_give_the_same_bits(scheme):
    rng = np.random.default_rng(7)
    n, g = 13, 128
    c = chunk(get_scheme(scheme).bits)
    k = 4 * g + c  # a last short group at every width
    _v, _s, _b, ops, _t = operands(rng, n, k, g, scheme, True)
    x = rng.standard_normal((5, k)).astype(np.float32)
    assert np.array_equal(run(kernel(n, k, g, scheme, True, True, shapes_of(ops)), x, ops, n),
                          run(kernel(n, k, g, scheme, True, False, shapes_of(ops)), x, ops, n))


@pytest.mark.skipif(not ZMM, reason="this CPU has no AVX-512 BW + VNNI: the 64-byte two-row path is not built here")
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("m", [1, 5])
def test_two_rows_per_64_byte_vector_give_the_same_bits(scheme, m):
    """The zmm path (two output rows per vector in decode tiles) against the 32-byte path: the
    same int32 sums, then each row's float steps unchanged, so equal bits; n = 13 leaves a
    3-row remainder (single rows), k a short last group (the 32-byte path), m = 5 one
    activation row past the 4-row prefill tile."""
    rng = np.random.default_rng(11)
    n, g = 13, 128
    c = chunk(get_scheme(scheme).bits)
    k = 3 * g + c
    _v, _s, _b, ops, _t = operands(rng, n, k, g, scheme, True)
    x = rng.standard_normal((m, k)).astype(np.float32)
    assert np.array_equal(run(kernel(n, k, g, scheme, True, True, shapes_of(ops), True), x, ops, n),
                          run(kernel(n, k, g, scheme, True, True, shapes_of(ops), False), x, ops, n))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_positions_follow_the_code_layout(bits):
    """``position`` puts weight w's activation where the shifted 32-byte load of its codes puts
    its code: decoding the sliced layout load by load must give codes in that order."""
    k = 4 * 2 * chunk(bits)
    codes = np.random.default_rng(0).integers(0, 1 << bits, (1, k)).astype(np.uint8)
    width = bits  # 2, 4 and 8 are their own field widths
    packed = pack_sliced(codes, width)
    assert np.array_equal(unpack_sliced(packed, width, k), codes)
    by_load = []
    for ld in range(k // (2 * chunk(bits))):
        raw = packed[0, ld * 32:(ld + 1) * 32]
        for h in range(8 // width):
            by_load.append((raw >> (width * h)) & ((1 << width) - 1))
    seen = np.concatenate(by_load)
    assert np.array_equal(seen[[position(i, bits) for i in range(k)]], codes[0])
    assert sorted(position(i, bits) for i in range(k)) == list(range(k))


def test_applies_names_what_it_does_not_cover():
    for scheme in SCHEMES:
        assert applies(layout(8, 576, 128, scheme)) is None, scheme
    assert "multiple of 128" in applies(layout(8, 576, 64, "rtn-int2"))
    assert "zero points" in applies(layout(8, 576, 128, "gguf-q4_1", affine=True))  # qlinear_a8's
    # grid values are read from the scheme: an unknown one is not covered
    assert "within +-64" in applies(layout(8, 576, 128, "rtn-int4-sym", scheme="no-such-scheme"))
    assert "zero points" in applies(layout(8, 576, 128, "rtn-int4-sym", bits=5))
    assert "in_features" in applies(layout(8, 600, 128, "rtn-int2"))
    assert "sparsity" in applies(layout(8, 576, 128, "rtn-int2", kept=288))
    assert "outliers" in applies(layout(8, 576, 128, "rtn-int2", outlier_width=3))


@pytest.fixture(scope="module")
def tiny():
    """A random two-layer Llama (hidden 64, mlp 128): with groups of 128 every 64-wide row is
    one short group, every 128-wide row one whole group."""
    from bitsmith.testing.hf_configs import make_model
    return make_model("llama")


@pytest.mark.parametrize("scheme", ["rtn-int2", "bitmod-w3"])
def test_option_runs_wide_group_layers_in_int8_within_tolerance(tiny, scheme, tmp_path, monkeypatch):
    import bitsmith
    from bitsmith.backends import backend_for_target
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path))
    ids = np.array([[0, 5, 9, 33, 12, 7, 40, 2]])
    kw = dict(quant=scheme, group_size=128)
    ref = np.asarray(bitsmith.compile(tiny, target="reference", **kw)(ids))
    fp = bitsmith.compile(tiny, target="tvm-llvm", **kw)
    a8 = bitsmith.compile(tiny, target="tvm-llvm", activation_bits=8, **kw)
    schedules = [v["schedule"] for v in a8.report()["executable"]["kernel_schedules"].values()]
    assert "vector-qlinear-a8" in schedules
    assert a8.report()["executable"]["activation_bits"] == 8
    got = np.asarray(a8(ids))
    tol = backend_for_target("tvm-llvm").tolerance("tvm-llvm", a8.options)
    assert tol.mismatch(got, ref) is None, tol.mismatch(got, ref)
    assert not np.array_equal(got, np.asarray(fp(ids)))  # the option changed the arithmetic
    a8.save(tmp_path / "a8")
    assert np.array_equal(np.asarray(bitsmith.load(tmp_path / "a8")(ids)), got)
