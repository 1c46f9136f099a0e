"""GPTQ (bitsmith.passes.quantization.gptq) against an independent textbook implementation,
against round-to-nearest, and its handling of outlier masks and dead inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir.quant_grids import fitted_schemes

from bitsmith.ir.code_packing import group_count
from bitsmith.passes.quantization.gptq import GPTQError, gptq_quantize_matrix, inverse_hessian_cholesky
from bitsmith.passes.quantization.groups import (decode, dequantize_matrix, fit_groups, quantize_matrix,
                                                 quantize_to_params)

SCHEME_NAMES = sorted(fitted_schemes())
GROUP_SIZES = st.sampled_from([3, 4, 8, 16, 32, 128])


def correlated_inputs(rng: np.random.Generator, tokens: int, k: int) -> np.ndarray:
    """Activations with correlated, unevenly scaled features and a non-zero mean, like an LLM's."""
    return rng.standard_normal((tokens, k)) @ rng.standard_normal((k, k)) + rng.standard_normal(k)


def reference_gptq(w: np.ndarray, hessian: np.ndarray, scheme, group_size: int,
                   mask: np.ndarray, damp: float = 0.01, act_order: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The unblocked form of GPTQ (Frantar et al. 2023, eqs. 2-3, i.e. OBQ with a fixed order):
    explicit H⁻¹, each column's error pushed through its row of H⁻¹, then column j removed from
    H⁻¹ by Gaussian elimination. No Cholesky factor, no lazy blocks. Returns the weights the
    algorithm chose [N, K] (outliers at their original value) and the codes.

    ``act_order``: columns visited by decreasing diagonal of H, every group fitted first on the
    weights as given (static groups). Everything stays in the original column space: the
    elimination removes each visited column from H⁻¹, so no permutation is ever formed."""
    n, k = w.shape
    h = np.array(hessian, dtype=np.float64)
    work = w.astype(np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    work[:, dead] = 0
    order = sorted(range(k), key=lambda j: -h[j, j]) if act_order else range(k)  # sorted() is stable
    static = [fit_groups(work[:, g:g + group_size].astype(np.float32), scheme, mask[:, g:g + group_size])
              for g in range(0, k, group_size)] if act_order else None
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    chosen = np.zeros((n, k))
    codes = np.zeros((n, k), dtype=np.uint8)
    params = None
    for j in order:
        if static is not None:
            params = static[j // group_size]
        elif j % group_size == 0:
            end = min(j + group_size, k)
            params = fit_groups(work[:, j:end].astype(np.float32), scheme, mask[:, j:end])
        c = quantize_to_params(work[:, j:j + 1].astype(np.float32), params, scheme)
        q = np.where(mask[:, j], decode(c, params, scheme)[:, 0], w[:, j])
        chosen[:, j], codes[:, j] = q, c[:, 0]
        err = (work[:, j] - q) / hinv[j, j]
        work -= np.outer(err, hinv[j, :])  # row j of H⁻¹ is zero at every column already visited
        hinv -= np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return chosen, codes


@st.composite
def problems(draw, min_rows=1, max_rows=12, min_cols=1, max_cols=70):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(min_rows, max_rows))
    k = draw(st.integers(min_cols, max_cols))
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3)).astype(np.float32)
    return rng, w


# ---------------------------------------------------------------- the defining property

@settings(max_examples=30, deadline=None)
@given(problems(min_rows=16, max_rows=32, min_cols=24, max_cols=96), st.sampled_from(SCHEME_NAMES), GROUP_SIZES)
def test_output_error_no_worse_than_round_to_nearest(problem, scheme_name, group_size):
    # GPTQ is greedy, so it can lose to RTN: summed over >= 16 rows and 4 tokens per column, the
    # error ratio GPTQ / RTN measured median 0.51, 99th percentile 0.88 and worst 1.0001 over 600
    # random problems (this strategy's ranges), and hypothesis once found 1.020 (rtn-int3, groups
    # of 4, 26 columns: little left to compensate within such groups). 5% slack is 2.5x that
    # excess; that GPTQ really gains is held by test_output_error_clearly_better_on_a_layer.
    rng, w = problem
    x = correlated_inputs(rng, 4 * w.shape[1], w.shape[1])
    scheme = fitted_schemes()[scheme_name]
    gptq = dequantize_matrix(gptq_quantize_matrix(w, x.T @ x, scheme, group_size), scheme, group_size)
    rtn = dequantize_matrix(quantize_matrix(w, scheme, group_size), scheme, group_size)

    def output_error(q):
        return float(np.sum(np.square(x @ (w.astype(np.float64) - q).T)))

    assert output_error(gptq) <= output_error(rtn) * 1.05


def test_output_error_clearly_better_on_a_layer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    x = correlated_inputs(rng, 1024, 256)
    for name in ("rtn-int3", "bitmod-w3", "fp4"):
        scheme = fitted_schemes()[name]
        gptq = dequantize_matrix(gptq_quantize_matrix(w, x.T @ x, scheme, 128), scheme, 128)
        rtn = dequantize_matrix(quantize_matrix(w, scheme, 128), scheme, 128)
        ratio = np.sum(np.square(x @ (w - gptq).T)) / np.sum(np.square(x @ (w - rtn).T))
        assert ratio < 0.8, (name, ratio)


# ---------------------------------------------------------------- against the textbook algorithm

@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(SCHEME_NAMES), GROUP_SIZES, st.sampled_from([0.0, 0.05, 0.3]),
       st.sampled_from([0.0, 0.2]), st.sampled_from([1, 4, 128]))
def test_matches_unblocked_reference(problem, scheme_name, group_size, outlier_share, dead_share, block_size):
    """Blocked Cholesky GPTQ chooses the same weights as the unblocked textbook form; and
    ``dequantize_matrix`` of its result is exactly what it chose (outliers aside)."""
    rng, w = problem
    n, k = w.shape
    scheme = fitted_schemes()[scheme_name]
    x = correlated_inputs(rng, 2 * k + 3, k)
    x[:, rng.random(k) < dead_share] = 0  # inputs that are always zero
    mask = rng.random((n, k)) >= outlier_share
    qm = gptq_quantize_matrix(w, x.T @ x, scheme, group_size, mask=mask, block_size=block_size)
    chosen, codes = reference_gptq(w, x.T @ x, scheme, group_size, mask)

    g = group_count(k, group_size)
    assert qm.codes.shape == (n, k) and qm.scales.shape == (n, g) and qm.scales.dtype == np.float16
    assert (qm.zeros is not None) == scheme.asymmetric and (qm.selectors is not None) == bool(scheme.selector_bits)
    # float64 round-off of the two forms differs by ~1e-13 relative; a weight that close to a
    # rounding midpoint has probability ~1e-12, so codes must agree exactly
    np.testing.assert_array_equal(qm.codes[mask], codes[mask])
    decoded = dequantize_matrix(qm, scheme, group_size)
    np.testing.assert_array_equal(decoded[mask], chosen[mask].astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(SCHEME_NAMES), GROUP_SIZES, st.sampled_from([0.0, 0.05, 0.3]),
       st.sampled_from([0.0, 0.2]), st.sampled_from([1, 4, 128]))
def test_act_order_matches_unblocked_reference(problem, scheme_name, group_size, outlier_share, dead_share,
                                               block_size):
    """act_order: the permuted, blocked Cholesky loop, its codes written back at their stored
    columns, chooses the same weights as the unblocked reference visiting the columns in the
    original index space; and the stored group parameters are the ones fitted on the weights
    as given (static groups), i.e. round-to-nearest's, so contiguous groups stay valid."""
    rng, w = problem
    n, k = w.shape
    scheme = fitted_schemes()[scheme_name]
    x = correlated_inputs(rng, 2 * k + 3, k)
    x[:, rng.random(k) < dead_share] = 0
    mask = rng.random((n, k)) >= outlier_share
    qm = gptq_quantize_matrix(w, x.T @ x, scheme, group_size, mask=mask, block_size=block_size, act_order=True)
    chosen, codes = reference_gptq(w, x.T @ x, scheme, group_size, mask, act_order=True)
    # as in test_matches_unblocked_reference: round-off differences ~1e-13, codes agree exactly
    np.testing.assert_array_equal(qm.codes[mask], codes[mask])
    np.testing.assert_array_equal(dequantize_matrix(qm, scheme, group_size)[mask], chosen[mask].astype(np.float32))
    live = (x != 0).any(axis=0)
    rtn = quantize_matrix(np.where(live, w, 0).astype(np.float32), scheme, group_size, mask)
    for field in ("scales", "zeros", "selectors"):
        if getattr(rtn, field) is not None:
            np.testing.assert_array_equal(getattr(qm, field), getattr(rtn, field))


@settings(max_examples=30, deadline=None)
@given(problems(min_rows=2), st.sampled_from(SCHEME_NAMES), GROUP_SIZES)
def test_outliers_are_left_out_of_fitting_and_compensation(problem, scheme_name, group_size):
    """Masked weights keep their original value, so only the compensation that reached them
    (not their value) propagates: scaling them by 1000 changes nothing else."""
    rng, w = problem
    scheme = fitted_schemes()[scheme_name]
    x = correlated_inputs(rng, 2 * w.shape[1] + 3, w.shape[1])
    mask = rng.random(w.shape) >= 0.1
    wild = np.where(mask, w, w * 1000).astype(np.float32)
    a = gptq_quantize_matrix(w, x.T @ x, scheme, group_size, mask=mask)
    b = gptq_quantize_matrix(wild, x.T @ x, scheme, group_size, mask=mask)
    np.testing.assert_array_equal(a.scales, b.scales)
    for field in ("zeros", "selectors"):
        if getattr(a, field) is not None:
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.codes[mask], b.codes[mask])


# ---------------------------------------------------------------- uncorrelated inputs: RTN

@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(SCHEME_NAMES), GROUP_SIZES, st.booleans())
def test_diagonal_hessian_equals_round_to_nearest(problem, scheme_name, group_size, with_mask):
    """With uncorrelated inputs (diagonal H) no error crosses columns: each group is fitted on
    the original weights and each weight rounded to nearest, exactly as quantize_matrix does."""
    rng, w = problem
    scheme = fitted_schemes()[scheme_name]
    mask = rng.random(w.shape) >= 0.2 if with_mask else np.ones(w.shape, dtype=bool)
    hessian = np.diag(rng.uniform(0.1, 10, w.shape[1]))
    got = gptq_quantize_matrix(w, hessian, scheme, group_size, mask=mask if with_mask else None)
    want = quantize_matrix(w, scheme, group_size, mask=mask if with_mask else None)
    np.testing.assert_array_equal(got.scales, want.scales)
    for field in ("zeros", "selectors"):
        if getattr(want, field) is None:
            assert getattr(got, field) is None
        else:
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    np.testing.assert_array_equal(got.codes[mask], want.codes[mask])


# ---------------------------------------------------------------- pieces and errors

@pytest.mark.parametrize("k", [1, 5, 127, 300])
def test_inverse_hessian_cholesky_is_upper_factor_of_damped_inverse(k):
    rng = np.random.default_rng(k)
    x = correlated_inputs(rng, 2 * k, k)
    h = x.T @ x
    u = inverse_hessian_cholesky(h, damp=0.01)
    damped_inverse = np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(k))
    np.testing.assert_array_equal(u, np.triu(u))
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u, damped_inverse, rtol=1e-9, atol=1e-12 * np.abs(damped_inverse).max())


def test_singular_hessian_without_damping_raises_or_recovers():
    """Rank-1 H with damp=0: Cholesky fails at λ=0, so λ becomes the documented floor
    1e-8 * max(mean diag H, 1) = 1e-8 and U must be the upper factor of (H + λI)⁻¹. Checked
    without forming that ill-conditioned inverse: R = U⁻¹ must satisfy R Rᵀ = H + 1e-8 I (float64
    rounding on O(1) entries is ~1e-16; 1e-14 leaves 100x; the next λ, 1e-7, would be 9e-8 off)."""
    h = np.ones((4, 4))  # rank 1: positive semi-definite only
    u = inverse_hessian_cholesky(h, damp=0.0)  # retried with growing damping
    np.testing.assert_array_equal(u, np.triu(u))
    assert (np.diag(u) > 0).all()
    r = np.linalg.inv(u)
    np.testing.assert_allclose(r @ r.T, h + 1e-8 * np.eye(4), rtol=0, atol=1e-14)
    with pytest.raises(GPTQError, match="not positive definite"):
        inverse_hessian_cholesky(-np.eye(3), damp=0.0, retries=2)


def test_rejects_mismatched_shapes():
    w = np.zeros((2, 3), dtype=np.float32)
    scheme = fitted_schemes()["fp4"]
    with pytest.raises(GPTQError, match="Hessian shape"):
        gptq_quantize_matrix(w, np.eye(4), scheme, 2)
    with pytest.raises(GPTQError, match="mask shape"):
        gptq_quantize_matrix(w, np.eye(3), scheme, 2, mask=np.ones((3, 2), dtype=bool))
    with pytest.raises(GPTQError, match="group_size"):
        gptq_quantize_matrix(w, np.eye(3), scheme, 0)
