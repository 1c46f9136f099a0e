"""The float32 BLAS calibration runner (``numpy-fp32``) against the reference interpreter: its
blocked causal attention on random shapes, and the Hessians it collects on the test models,
plain and sequential, within bounds derived from float32 rounding."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith.backends.calibration import calibration_runner
from bitsmith.backends.float32_blas import Float32BlasRunner, causal_attention_fp32
from bitsmith.ir.interpreter import causal_attention
from bitsmith.passes import get_pass
from bitsmith.passes.quantization.calibration import calibration_windows, collect_statistics
from bitsmith.testing.hf_configs import ARCHS, VOCAB, make_model

U = 2.0 ** -24  # float32 unit roundoff


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 2), g=st.integers(1, 3), s=st.integers(1, 12),
       past=st.integers(0, 6), d=st.integers(1, 8), causal=st.booleans(), masked=st.booleans(),
       block=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_blocked_attention_equals_the_reference(b, hk, g, s, past, d, causal, masked, block, seed):
    rng = np.random.default_rng(seed)
    t = past + s
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((b, hk * g, s, d), (b, hk, t, d), (b, hk, t, d)))
    mask = (rng.random((b, t)) < 0.7).astype(np.int64) if masked else None
    scale = 1 / np.sqrt(d)
    want = causal_attention(q, k, v, scale, causal, mask)  # float64 inside, rounded once
    got = causal_attention_fp32(q, k, v, scale, causal, mask, block=block)
    # float32 error: a score is a d-term dot product (error <= d*u*sum|q_i k_i|*scale), which
    # moves a probability by at most ~2x that relatively; exp, the t-term sums and the
    # probability-weighted sum of values add (t + 4)*u; all scaled by max|v|
    dots = scale * np.abs(q).max() * np.abs(k).max() * d
    atol = (2 * (d + 1) * U * dots + (t + 4) * U) * np.abs(v).max() * 4  # 4: slack over the bound's constants
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    assert got.dtype == np.float32


def hessian_bound(model_module, length: int) -> float:
    """Relative bound for a float32 forward's Hessian: each linear adds ~K*u relative error to
    its output (K = input features; a residual block carries the errors of those before it), a
    Gram entry doubles an activation's relative error and adds the length-term float32 sum."""
    fn = model_module.function("main")
    types = fn.value_types()
    ks = [types[n.inputs[0]].shape[-1] for n in fn.nodes if n.op == "linear"]
    return (2 * sum(ks) + length) * U * 4  # 4: slack for the elementwise ops between the linears


@pytest.fixture(scope="module")
def llama():
    return bitsmith.compile(make_model("llama")).module


@pytest.fixture(scope="module")
def windows():
    return calibration_windows(np.random.default_rng(0).integers(0, VOCAB, size=3 * 40), sequences=3, length=40)


def test_auto_is_tvm_llvm_else_the_float32_runner():
    from bitsmith.backends.calibration import BackendRunner
    has_tvm = importlib.util.find_spec("tvm") is not None
    assert calibration_runner("auto") == (BackendRunner("tvm-llvm") if has_tvm else Float32BlasRunner())
    assert isinstance(calibration_runner("numpy-fp32"), Float32BlasRunner)


@pytest.mark.parametrize("arch", [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_statistics_equal_the_reference(arch, llama, windows):
    module = llama if arch == "llama" else bitsmith.compile(make_model(arch)).module
    want = collect_statistics(module, windows)
    got = collect_statistics(module, windows, runner=Float32BlasRunner())
    assert set(got) == set(want)
    bound = hessian_bound(module, 40)
    for name in want:
        scale = np.abs(want[name].hessian).max()
        np.testing.assert_allclose(got[name].hessian, want[name].hessian, rtol=0, atol=bound * scale)
        np.testing.assert_allclose(got[name].column_norms, want[name].column_norms, rtol=bound)
        assert got[name].tokens == want[name].tokens


def test_sequential_statistics_equal_the_reference(llama, windows):
    """Sequential calibration through quantized layers (qlinear runs in float32 from its decoded
    weight): each stage's Hessian equals the reference interpreter's on the final quantized
    module (stage k's input does not depend on the layers quantized after it)."""
    from test_calibration_options import WindowCalibration
    calib = WindowCalibration(windows, Float32BlasRunner())
    recorded = calib.recorded
    quantized = get_pass("quantize", scheme="rtn-int4", group_size=16, calibrate=True, calibration=calib,
                         sequential=True).apply(llama)
    want = collect_statistics(quantized, windows)
    assert len(recorded) == 8 and set(recorded) <= set(want)
    bound = hessian_bound(llama, 40)
    for value, got in recorded.items():
        np.testing.assert_allclose(got.hessian, want[value].hessian, rtol=0,
                                   atol=bound * np.abs(want[value].hessian).max())
