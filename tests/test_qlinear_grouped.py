"""The grouped float qlinear kernel (backends/tvm/qlinear_grouped.py, GGUF Q4_0 / Q4_1 / Q4_K /
Q8_0 blocks): against numpy's float64 product with the IR's dequantized weight (the oracle), over
random layers and activation counts covering both of its paths (tiles of 8 activation rows, the
rest two output rows at a time, leftover rows one by one).

Tolerance: a first-order float32 summation bound, ``terms * eps * sum_k |x_k| (|d| (|c_k| + |low|)
+ |m|)``. The kernel sums ``d_g sum c x`` and ``(d_g low + m_g) sum x`` separately, so the
magnitudes of both terms count, not just |w| (they cancel in part for Q4_0, low = -8);
``terms`` = K/16 + 32 (16 lanes summing K/16 products each, group and tile sums, a 16-lane
tree, the offset dot). A wrong code, scale, offset or group moves an output by about one
weight's |x||w|, far above it. Measured: at most 7e-8 of sum |x||w| on 1536 x 576 layers,
against (K/16 + 32) * 1.2e-7 >= 4.0e-6 here.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitsmith.ir.quant_grids import get_scheme
from bitsmith.ir.quantized import dequantize

from lut_operands import random_qlinear

pytest.importorskip("tvm")

EPS32 = float(np.finfo(np.float32).eps)
SCHEMES = ("gguf-q4_0", "gguf-q4_1", "gguf-q4_k", "gguf-q8_0")  # Q4_K: float32 scales and offsets


@pytest.fixture(scope="module")
def compile_qlinear():
    from bitsmith.backends.tvm.matmul import compile_qlinear
    return compile_qlinear


def _magnitudes(attrs, ops, w, x):
    """Per output, a bound on sum_k |x_k| (|d| (|c_k| + |low|) + |m|) (module doc): with
    |d| |c| <= |w - m| + |d| |low|, it is at most sum_k |x_k| (|w_k| + 2 |d| |low| + 2 |m|).
    ``ops``: codes, scales[, offsets] (IR order)."""
    sc = get_scheme(attrs["scheme"])
    low = abs(sc.candidates[0].values[0])
    n, k = w.shape

    def per_weight(a):  # [n, groups] -> [n, k], groups of 32
        return np.repeat(np.abs(a.astype(np.float64)), 32, axis=1)[:, :k]

    extra = 2 * low * per_weight(ops[1]) + (2 * per_weight(ops[2]) if sc.offsets else 0.0)
    return np.abs(x).astype(np.float64) @ (np.abs(w.astype(np.float64)) + extra).T


@settings(max_examples=12, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), n=st.integers(1, 37), groups=st.integers(1, 40),
       m=st.sampled_from([1, 2, 3, 7, 8, 9, 17]), seed=st.integers(0, 2**32 - 1))
def test_grouped_kernel_equals_the_dequantized_product(compile_qlinear, scheme, n, groups, m, seed):
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.matmul_cpu import VECTOR_QLINEAR_GROUPED, choose_schedule
    rng = np.random.default_rng(seed)
    k = 32 * groups
    attrs, ops = random_qlinear(rng, scheme, n, k, 32)
    assert choose_schedule(qlinear_kernel(attrs, qlinear_operands(attrs, ops, "float32"), "float32")) \
        == VECTOR_QLINEAR_GROUPED
    w = dequantize(attrs, ops)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    y = compile_qlinear(attrs, ops)(x)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = (k / 16 + 32) * EPS32 * _magnitudes(attrs, ops, w, x) + 1e-30
    assert np.all(np.abs(y - want) <= bound), np.max(np.abs(y - want) / bound)


def test_kernel_refuses_layouts_it_does_not_cover():
    from bitsmith.backends.tvm.qlinear_grouped import applies
    from bitsmith.backends.tvm.qlinear_layout import layout_for
    rng = np.random.default_rng(0)
    for scheme, g, k, words in (("gguf-q4_1", 32, 48, "in_features % 32"), ("gguf-q6_k", 16, 256, "affine 4-bit"),
                                ("rtn-int4", 32, 64, "affine 4-bit")):
        attrs, _ops = random_qlinear(rng, scheme, 4, k, g)
        assert words in (applies(layout_for(attrs, 0)) or ""), scheme
