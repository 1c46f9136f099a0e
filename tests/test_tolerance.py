"""Tolerance: the elementwise rule matches numpy.isclose (the oracle) when scale_rtol is 0, and
the scale term adds exactly scale_rtol * max|want|."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra.numpy import arrays

from bitsmith.tolerance import Tolerance, max_errors

floats = st.floats(-1e3, 1e3, width=32) | st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0])
pairs = st.integers(1, 6).flatmap(lambda n: st.tuples(arrays(np.float32, n, elements=floats),
                                                       arrays(np.float32, n, elements=floats)))
tols = st.sampled_from([0.0, 1e-6, 1e-3, 0.5])


@given(pairs, tols, tols)
def test_agrees_with_numpy_isclose(pair, rtol, atol):
    got, want = pair
    with np.errstate(invalid="ignore", over="ignore"):
        oracle = bool(np.isclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol,
                                 equal_nan=True).all())
    assert (Tolerance(rtol, atol).mismatch(got, want) is None) == oracle


@given(st.one_of(st.just(0.0), st.floats(1e-9, 1)), st.floats(1e-3, 10))
def test_scale_term_is_a_fraction_of_the_largest_magnitude(scale_rtol, peak):
    """scale_rtol is 0 or at least 1e-9: below that, adding 0.99 * scale_rtol * peak to peak
    rounds (one ulp, 2.2e-16 relative) by more than the 1% margin this test leaves."""
    want = np.array([peak, -peak / 2, 0.0])
    tol = Tolerance(0.0, 0.0, scale_rtol)
    inside, outside = want + scale_rtol * peak * 0.99, want + scale_rtol * peak * 1.01 + 1e-12
    assert tol.mismatch(inside, want) is None
    assert tol.mismatch(outside, want) is not None


def test_integers_dtypes_shapes_and_counts_must_match_exactly():
    tol = Tolerance(1.0, 1.0)
    assert "elements differ" in tol.mismatch(np.array([1, 2]), np.array([1, 3]))
    assert "int32" in tol.mismatch(np.array([1], np.int32), np.array([1], np.int64))
    assert "[2]" in tol.mismatch(np.zeros(2, np.float32), np.zeros(3, np.float32))
    assert "2 results" in tol.compare([np.zeros(1)] * 2, [np.zeros(1)])
    with pytest.raises(ValueError):
        Tolerance(-1.0, 0.0)


def test_max_errors_skips_non_finite_elements():
    got, want = [np.array([1.0, np.inf, 2.5])], [np.array([1.5, np.inf, 2.0])]
    assert max_errors(got, want) == (0.5, 0.5 / 1.5)
