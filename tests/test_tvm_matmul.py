"""tvm matmul kernels (dense ``linear`` and quantized ``qlinear``) against the reference.

Oracle: ``bitsmith.ir.quantized.dequantize`` (the dense weight the interpreter's qlinear
multiplies by) and numpy matmul in float64. Operands are made by the quantize pass's own
helpers (group fitting, N:M compression, outlier selection, packing), independent of the kernels.

Tolerance (float32 activations): |y - ref| <= 1e-5 * sqrt(K) * max|x| * max|W| + 1e-6 * |ref|.
The kernel and the reference add the same K float32 products in different orders; each
partial sum is rounded to float32 (eps 6e-8), so the difference is a random walk of about
sqrt(K) * eps * |x||w| (worst case K * eps). 1e-5 sqrt(K) leaves a 100x margin over the typical
case, while one wrong code, scale, zero point, selector, column or outlier changes y by at least
~|x||w| * scale-step, orders of magnitude above it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

from bitsmith.backends.tvm import matmul as mm  # noqa: E402
from bitsmith.backends.tvm.matmul_cpu import generic_schedule  # noqa: E402
from bitsmith.backends.tvm.qlinear_layout import (  # noqa: E402
    field_width, native_scheme, pack_sliced, sliced_length, unpack_sliced)
from bitsmith.errors import BitsmithError  # noqa: E402
from bitsmith.ir.quant_grids import fitted_schemes, get_scheme  # noqa: E402
from bitsmith.ir.quantized import dequantize  # noqa: E402
from bitsmith.passes.quantization.groups import quantize_matrix  # noqa: E402
from bitsmith.passes.quantization.pack import qlinear_operands as pack_qlinear  # noqa: E402
from qlinear_cases import make_qlinear  # noqa: E402

ALL_SCHEMES = sorted(n for n, s in fitted_schemes().items() if native_scheme(s))  # others run dense (scheme_fallback)


def reference(attrs, arrays, x):
    n_weight = len(arrays) - (1 if attrs["bias"] else 0)
    w = dequantize(attrs, arrays[:n_weight]).astype(np.float64)
    y = x.astype(np.float64) @ w.T
    if attrs["bias"]:
        y = y + arrays[-1]
    return y, w


def assert_close(y, ref, x, w):
    k = x.shape[1]
    atol = 1e-5 * math.sqrt(k) * max(np.abs(x).max(), 1e-30) * max(np.abs(w).max(), 1e-30)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=1e-6, atol=atol)


def check_qlinear(rng, attrs, arrays, ms=(1, 3, 64)):
    fn = mm.compile_qlinear(attrs, arrays)
    for m in ms:
        x = rng.standard_normal((m, attrs["in_features"])).astype(np.float32)
        ref, w = reference(attrs, arrays, x)
        assert_close(fn(x), ref, x, w)


# ---------------------------------------------------------------- layout

@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 5), st.integers(1, 300), st.data())
def test_sliced_layout_round_trips(width, rows, count, data):
    fields = np.asarray(data.draw(st.lists(st.integers(0, (1 << width) - 1), min_size=rows * count,
                                           max_size=rows * count)), dtype=np.uint8).reshape(rows, count)
    packed = pack_sliced(fields, width)
    assert packed.shape == (rows, sliced_length(count, width)) and packed.dtype == np.uint8
    assert (unpack_sliced(packed, width, count) == fields).all()


def test_field_width():
    assert [field_width(b) for b in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, 8]


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_operands_keep_codes_packed_and_no_dense_weights(scheme):
    rng = np.random.default_rng(1)
    k, n = 256, 24
    attrs, arrays = make_qlinear(rng, scheme, k, n, 64, outliers=0.02, bias=True)
    ops = mm.qlinear_operands(attrs, arrays, "float32")
    bits = get_scheme(scheme).bits
    code_bytes = sum(a.nbytes for a in ops if a.dtype == np.uint8 and a.shape == (n, a.shape[1])
                     and a.shape[1] >= k // 8)
    assert code_bytes * 8 <= n * k * bits  # k is a multiple of every chunk: no padding here
    floats = sum(a.size for a in ops if a.dtype.kind == "f")
    assert floats < n * k // 4  # scales, corrections, bias: nothing near a dense matrix
    again = mm.qlinear_operands(attrs, arrays, "float32")
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(ops, again))


# ---------------------------------------------------------------- qlinear numerics

@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_qlinear_every_scheme_odd_shape(scheme):
    # in 200 = 3 * 64 + 8: the last group of each row is short; out 37 is no multiple of 8/16
    rng = np.random.default_rng(hash(scheme) % 2**32)
    check_qlinear(rng, *make_qlinear(rng, scheme, 200, 37, 64, bias=True))


@pytest.mark.parametrize("scheme", ["rtn-int4", "rtn-int3", "bitmod-w3", "bitmod-w4"])
@pytest.mark.parametrize("sparsity", ["2:4", "4:8"])
def test_qlinear_sparse_with_outliers(scheme, sparsity):
    rng = np.random.default_rng(7)
    check_qlinear(rng, *make_qlinear(rng, scheme, 168, 29, 32, sparsity=sparsity, outliers=0.03))


def test_qlinear_outliers_flag_with_no_outliers():
    rng = np.random.default_rng(11)
    k, n = 64, 12
    w = rng.standard_normal((n, k)).astype(np.float32)
    s = get_scheme("fp4")
    attrs = dict(scheme="fp4", group_size=32, in_features=k, out_features=n, sparsity="", outliers=0.01, bias=False)
    arrays = pack_qlinear(quantize_matrix(w, s, 32), s, attrs, np.zeros((n, k), bool), w)
    assert arrays[-1].tolist() == [0] * (n + 1)
    check_qlinear(rng, attrs, arrays)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=st.sampled_from(ALL_SCHEMES), k_blocks=st.integers(1, 40), n=st.integers(1, 70),
       group_size=st.sampled_from([16, 20, 32, 48, 64, 128]), sparsity=st.sampled_from(["", "", "2:4", "4:8", "1:4"]),
       outliers=st.sampled_from([0.0, 0.0, 0.04]), bias=st.booleans(), seed=st.integers(0, 2**31))
def test_qlinear_matches_reference(scheme, k_blocks, n, group_size, sparsity, outliers, bias, seed):
    rng = np.random.default_rng(seed)
    k = k_blocks * 8 + (0 if sparsity else int(rng.integers(0, 8)))  # multiple of M under N:M
    attrs, arrays = make_qlinear(rng, scheme, k, n, group_size, sparsity, outliers, bias)
    check_qlinear(rng, attrs, arrays, ms=(1, 3, int(rng.integers(4, 70))))


@pytest.mark.parametrize("scheme,sparsity,outliers", [("bitmod-w4", "", 0.03), ("rtn-int3", "2:4", 0.03),
                                                      ("rtn-int2-sym", "", 0.0)])
def test_generic_schedule_of_the_definition(scheme, sparsity, outliers):
    """The unscheduled definition (what the CUDA scheduler starts from) is itself right."""
    rng = np.random.default_rng(3)
    attrs, arrays = make_qlinear(rng, scheme, 136, 21, 32, sparsity, outliers, bias=True)
    ops = mm.qlinear_operands(attrs, arrays, "float32")
    kdef = mm.qlinear_kernel(attrs, ops, "float32")
    assert kdef.kind == "qgemv" and len(kdef.func.params) == len(ops) + 2
    fn = tvm.compile(generic_schedule(kdef), target="llvm")["main"]
    x = rng.standard_normal((3, 136)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((3, 21), np.float32))
    fn(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in ops], y)
    ref, w = reference(attrs, arrays, x)
    assert_close(y.numpy(), ref, x, w)


def test_qlinear_table_gather_path_without_ssse3():
    """Baseline x86-64 (no SSSE3) takes the table-gather decode that non-x86 targets use."""
    rng = np.random.default_rng(9)
    attrs, arrays = make_qlinear(rng, "bitmod-w3", 144, 19, 32, "2:4", 0.03, bias=True)
    baseline = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
    kdef = mm.qlinear_kernel(attrs, mm.qlinear_operands(attrs, arrays, "float32"), "float32")
    assert "pshuf" not in mm.schedule_matmul_cpu(kdef, baseline).script()
    from tvm.target import codegen
    if codegen.llvm_cpu_has_features("ssse3", mm.host_target()):
        assert "pshuf" in mm.schedule_matmul_cpu(kdef, mm.host_target()).script()
    fn = mm.compile_qlinear(attrs, arrays, target=baseline)
    for m in (1, 5):
        x = rng.standard_normal((m, 144)).astype(np.float32)
        ref, w = reference(attrs, arrays, x)
        assert_close(fn(x), ref, x, w)


def test_qlinear_float16_definitions_build_for_llvm():
    rng = np.random.default_rng(5)
    attrs, arrays = make_qlinear(rng, "bitmod-w4", 160, 24, 32, "2:4", 0.03, bias=True)
    ops = mm.qlinear_operands(attrs, arrays, "float16")
    assert ops[-1].dtype == np.float16  # bias in the activation dtype
    kdef = mm.qlinear_kernel(attrs, ops, "float16")
    assert str(kdef.func.params[0].buffer.dtype if hasattr(kdef.func.params[0], "buffer") else "float16")
    for mod in (generic_schedule(kdef), mm.schedule_matmul_cpu(kdef, mm.host_target())):
        tvm.compile(mod, target=mm.host_target())
    fn = mm.compile_qlinear(attrs, arrays, act_dtype="float16")
    x = rng.standard_normal((2, 160)).astype(np.float16)
    ref, _ = reference(attrs, arrays, x.astype(np.float32))
    np.testing.assert_allclose(fn(x).astype(np.float64), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())


def test_qlinear_bad_operands_raise():
    rng = np.random.default_rng(0)
    attrs, arrays = make_qlinear(rng, "rtn-int4", 64, 8, 32)
    with pytest.raises(BitsmithError, match="constant operands"):
        mm.qlinear_operands(attrs, arrays[:1], "float32")
    with pytest.raises(BitsmithError, match="operand codes"):
        mm.qlinear_operands(attrs, [arrays[0][:, :3]] + arrays[1:], "float32")
    with pytest.raises(BitsmithError, match="dtype"):
        mm.qlinear_kernel(attrs, mm.qlinear_operands(attrs, arrays, "float32"), "int8")
    kdef = mm.qlinear_kernel(attrs, mm.qlinear_operands(attrs, arrays, "float32"), "float32")
    with pytest.raises(BitsmithError, match="not llvm"):
        mm.schedule_matmul_cpu(kdef, tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))


# ---------------------------------------------------------------- dense linear

@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 80), bias=st.booleans(), seed=st.integers(0, 2**31))
def test_linear_matches_numpy(k, n, bias, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    fn = mm.compile_linear(w, b)
    for m in (1, 3, 64):
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
        assert_close(fn(x), ref, x, w)


def test_linear_kernel_definition_and_float16():
    kdef = mm.linear_kernel(96, 40, True, "float16", "float16")
    assert kdef.kind == "gemv" and len(kdef.func.params) == 4
    for mod in (generic_schedule(kdef), mm.schedule_matmul_cpu(kdef, mm.host_target())):
        tvm.compile(mod, target=mm.host_target())
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 96)).astype(np.float16)
    b = rng.standard_normal(40).astype(np.float16)
    x = rng.standard_normal((5, 96)).astype(np.float16)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(mm.compile_linear(w, b)(x).astype(np.float64), ref, rtol=2e-3,
                               atol=2e-3 * np.abs(ref).max())
    with pytest.raises(BitsmithError, match="dtype"):
        mm.linear_kernel(8, 8, False, "int8", "float32")


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=st.sampled_from(ALL_SCHEMES), k_blocks=st.integers(1, 80), n=st.integers(1, 100),
       group_size=st.sampled_from([16, 24, 32, 64, 96, 128]),
       sparsity=st.sampled_from(["", "2:4", "4:8", "1:2", "8:16"]), outliers=st.sampled_from([0.0, 0.02, 0.1]),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_qlinear_matches_reference_many(scheme, k_blocks, n, group_size, sparsity, outliers, bias, seed):
    rng = np.random.default_rng(seed)
    k = k_blocks * 16 + (0 if sparsity else int(rng.integers(0, 16)))
    attrs, arrays = make_qlinear(rng, scheme, k, n, group_size, sparsity, outliers, bias)
    check_qlinear(rng, attrs, arrays, ms=(1, 3, 5, 64))


# ---------------------------------------------------------------- parallel work split

@given(tasks=st.integers(1, 5000), floats=st.integers(1, 300))
def test_scratch_layout_covers_every_task_with_no_empty_slab(tasks, floats):
    from bitsmith.backends.tvm.matmul_cpu_kernels import SLABS, V, scratch_layout
    slabs, per_task, per_slab = scratch_layout(tasks, floats)
    assert 1 <= slabs <= SLABS
    assert slabs * per_task >= tasks > (slabs - 1) * per_task  # all covered, the last slab busy
    assert per_slab >= floats and per_slab % V == 0


@pytest.mark.parametrize("n", [576, 1000])  # 72 and 125 tasks of 8 rows: slabs of 2 tasks, the last one short
def test_qlinear_and_linear_with_several_tasks_per_slab(n):
    rng = np.random.default_rng(n)
    check_qlinear(rng, *make_qlinear(rng, "rtn-int4", 96, n, 32, bias=True), ms=(1, 5))
    w = rng.standard_normal((n * 3, 40)).astype(np.float32)  # dense: 16 rows per task
    fn = mm.compile_linear(w, None)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    assert_close(fn(x), x.astype(np.float64) @ w.T.astype(np.float64), x, w)


@pytest.mark.parametrize("avx512_tiling", [False, True])
def test_qlinear_m_tiles_of_8_then_4_then_single_rows(avx512_tiling, monkeypatch):
    """Every m from the tile walk's cases: 8-row tiles (AVX-512's tiling), one 4-row tile, single
    rows. The tiling is forced through the feature check so both run on any host (the choice
    is a register budget, not an instruction set: the code runs on the host's ISA)."""
    from bitsmith.backends.tvm import matmul_cpu
    real = matmul_cpu._has
    monkeypatch.setattr(matmul_cpu, "_has", lambda target, f: avx512_tiling if f == "avx512f" else real(target, f))
    rng = np.random.default_rng(21)
    for scheme, gs in (("rtn-int4", 32), ("bitmod-w3", 64)):
        attrs, arrays = make_qlinear(rng, scheme, 160, 27, gs, bias=True)
        fn = mm.compile_qlinear(attrs, arrays)
        for m in (1, 3, 4, 7, 8, 12, 13, 21):
            x = rng.standard_normal((m, 160)).astype(np.float32)
            ref, w = reference(attrs, arrays, x)
            assert_close(fn(x), ref, x, w)
