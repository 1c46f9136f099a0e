"""GGUF types (and the 8-bit rtn-int8 head) run natively on the CPU targets: the tvm-llvm qlinear
kernels against numpy's product with the IR's dequantized weight (the oracle). The LUT engine's
GGUF types (float offsets included) run through every property test of tests/test_lut_executor.py
(its ``layers`` draw them).

Tolerances are first-order float32 summation bounds, ``(terms summed in sequence) * eps * sum |x||w|``:
a wrong code, scale, offset or group index moves an output by about ``|x||w|`` of one weight,
orders of magnitude above them. Measured (tvm kernels, K <= 300): at most 5e-8 of ``sum |x||w|``,
against a bound of (K/16 + 32) * 1.2e-7 >= 3.8e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitsmith.backends.lut.decompose import native_scheme as lut_native
from bitsmith.backends.tvm.qlinear_layout import native_scheme, native_scheme_llvm
from bitsmith.ir.quant_grids import get_scheme
from bitsmith.ir.quantized import dequantize

from lut_operands import GGUF_SCHEMES, random_qlinear

EPS32 = float(np.finfo(np.float32).eps)
TVM_NEW = GGUF_SCHEMES + ("rtn-int8",)  # what the CPU kernels decode now and dense float32 ran before


def _qlinear(scheme: str, n: int, k: int, seed: int):
    sc = get_scheme(scheme)
    rng = np.random.default_rng(seed)
    attrs, ops = random_qlinear(rng, scheme, n, k, sc.block_size or 128)
    return attrs, ops, rng


def _summation_bound(x: np.ndarray, w: np.ndarray, terms: float) -> np.ndarray:
    return terms * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64)) + 1e-30


def test_every_gguf_type_is_native_on_both_cpu_targets_and_cuda_keeps_its_set():
    assert all(native_scheme_llvm(get_scheme(s)) and lut_native(get_scheme(s)) for s in TVM_NEW)
    assert not any(native_scheme(get_scheme(s)) for s in ("gguf-q4_1", "gguf-q8_0", "rtn-int8"))


@pytest.fixture(scope="module")
def tvm_kernels():
    pytest.importorskip("tvm")
    from bitsmith.backends.tvm.matmul import compile_qlinear
    return compile_qlinear


@settings(max_examples=8, deadline=None)
@given(scheme=st.sampled_from(TVM_NEW), n=st.integers(1, 40), k=st.integers(33, 300), m=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
def test_tvm_kernel_equals_the_dequantized_product(tvm_kernels, scheme, n, k, m, seed):
    """Ragged K (not a multiple of the block) included: the IR allows it, the kernel's short last
    group runs its whole 16-weight chunks vectorized and the rest scalar. K > 32: every example
    has at least one whole group on the vector path (tiny K would test only the scalar tail)."""
    attrs, ops, rng = _qlinear(scheme, n, k, seed)
    w = dequantize(attrs, ops)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    y = tvm_kernels(attrs, ops)(x)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    # 16 lane sums of K/16 terms, a tree over 16 lanes and a few accumulators, the scalar tail
    assert np.all(np.abs(y - want) <= _summation_bound(x, w, k / 16 + 32))


def test_tvm_gguf_kernels_use_the_vector_schedules():
    pytest.importorskip("tvm")
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.matmul_cpu import VECTOR_QLINEAR, VECTOR_QLINEAR_GROUPED, choose_schedule
    for scheme, want in (("gguf-q4_0", VECTOR_QLINEAR_GROUPED), ("gguf-q4_1", VECTOR_QLINEAR_GROUPED),
                         ("gguf-q4_k", VECTOR_QLINEAR_GROUPED),
                         ("gguf-q8_0", VECTOR_QLINEAR_GROUPED), ("gguf-q6_k", VECTOR_QLINEAR),
                         ("rtn-int8", VECTOR_QLINEAR)):
        attrs, ops, _ = _qlinear(scheme, 16, 256, 0)
        assert choose_schedule(qlinear_kernel(attrs, qlinear_operands(attrs, ops, "float32"), "float32")) \
            == want, scheme


def test_lut_refuses_float_offsets_with_outliers():
    from bitsmith.backends.lut.decompose import qlinear_reason
    attrs, _, _ = _qlinear("gguf-q4_1", 8, 64, 0)
    assert "offsets" in qlinear_reason({**attrs, "outliers": True})
