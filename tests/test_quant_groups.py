"""Group quantization numerics (bitsmith/passes/quantization): datatype selection, rounding,
bit packing, N:M masks and outlier selection, each against the scalar code in quant_reference."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitsmith.ir.quant_grids import fitted_schemes, get_scheme

from bitsmith.ir.code_packing import pack_codes, unpack_codes
from bitsmith.passes.quantization import (compress_nm, decode, dequantize_matrix, expand_nm, fit_groups, nm_mask,
                                          quantize_matrix, quantize_to_params, select_outliers)
from quant_reference import SCHEMES as REF_SCHEMES
from quant_reference import fp16, ref_asymmetric, ref_nearest, ref_pack, ref_symmetric_choice, ref_unpack

FEW = settings(max_examples=40, deadline=None)

weights = st.floats(-100, 100, width=32, allow_subnormal=False)


def blocks(max_rows: int = 6, max_cols: int = 16):
    """float32 [rows, g] blocks: random values, often with repeats, zeros and constant rows."""
    shapes = st.tuples(st.integers(1, max_rows), st.integers(1, max_cols))
    return shapes.flatmap(lambda s: hnp.arrays(np.float32, s, elements=weights | st.sampled_from([0.0, 1.0, -2.5])))


def masks_for(w: np.ndarray):
    return hnp.arrays(np.bool_, w.shape, elements=st.booleans() | st.just(True))


def test_reference_grids_match_the_ir_quant_grids():
    assert set(REF_SCHEMES) == set(fitted_schemes())
    for name, (bits, asym, grids) in REF_SCHEMES.items():
        scheme = get_scheme(name)
        assert (scheme.bits, scheme.asymmetric) == (bits, asym)
        assert [list(g.values) for g in scheme.candidates] == grids


@FEW
@given(st.sampled_from(["bitmod-w3", "bitmod-w4", "fp3", "fp4", "rtn-int3-sym"]), blocks(), st.data())
def test_selector_picks_least_error_candidate_ties_to_first(name, w, data):
    mask = data.draw(masks_for(w))
    scheme = get_scheme(name)
    params = fit_groups(w, scheme, mask)
    grids = REF_SCHEMES[name][2]
    for r in range(w.shape[0]):
        sel, scale, errors = ref_symmetric_choice(w[r].tolist(), mask[r].tolist(), grids)
        got_sel = 0 if params.selector is None else int(params.selector[r])
        assert got_sel == sel, (errors, got_sel)
        assert float(params.scale[r]) == scale
        assert params.scale.dtype == np.float16


@FEW
@given(st.sampled_from(["rtn-int2", "rtn-int3", "rtn-int4"]), blocks(), st.data())
def test_asymmetric_min_max_scale_and_zero(name, w, data):
    mask = data.draw(masks_for(w))
    scheme = get_scheme(name)
    params = fit_groups(w, scheme, mask)
    assert params.zero.dtype == np.uint8 and params.selector is None
    levels = 1 << REF_SCHEMES[name][0]
    for r in range(w.shape[0]):
        scale, zero = ref_asymmetric(w[r].tolist(), mask[r].tolist(), levels)
        assert (float(params.scale[r]), int(params.zero[r])) == (scale, zero)


@pytest.mark.parametrize("name", sorted(fitted_schemes()))
def test_constant_and_zero_groups_decode_exactly(name):
    scheme = get_scheme(name)
    w = np.array([[0.0] * 4, [0.75] * 4, [-3.0] * 4], dtype=np.float32)
    params = fit_groups(w, scheme)
    out = decode(quantize_to_params(w, params, scheme), params, scheme)
    assert np.all(out[0] == 0)
    # a constant group is its own extreme: off only by the fp16 rounding of absmax / max|grid|
    # (exact for asymmetric grids, whose scale is then the fp16 constant itself)
    assert np.allclose(out[1:], w[1:], rtol=2.0 ** -11, atol=0)
    if scheme.asymmetric:
        assert np.array_equal(out[1:], w[1:])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(fitted_schemes())), blocks(), st.data())
def test_rounding_is_nearest_inside_the_range_and_clips_outside(name, w, data):
    """Every weight inside [min*s, max*s] of its row's scaled grid is within half of its
    surrounding gap and lands on one of the two neighbours; weights outside go to the nearest
    end. Checked exactly (Fractions) against the grid values the row's parameters imply."""
    mask = data.draw(masks_for(w))
    scheme = get_scheme(name)
    bits, asym, grids = REF_SCHEMES[name]
    params = fit_groups(w, scheme, mask)
    codes = quantize_to_params(w, params, scheme)
    out = decode(codes, params, scheme)
    assert codes.dtype == np.uint8 and out.dtype == np.float32 and out.shape == w.shape
    for r in range(w.shape[0]):
        s = np.float32(params.scale[r])
        if asym:
            z = np.float32(params.zero[r])
            scaled = sorted(float((np.float32(c) - z) * s) for c in grids[0])
        else:
            sel = 0 if params.selector is None else int(params.selector[r])
            scaled = sorted(float(np.float32(v) * s) for v in grids[sel])
        for x, y in zip(w[r].tolist(), out[r].tolist()):
            assert y in scaled
            if x <= scaled[0]:
                assert y == scaled[0]
            elif x >= scaled[-1]:
                assert y == scaled[-1]
            else:
                i = max(j for j, v in enumerate(scaled) if v <= x)
                a, b = scaled[i], scaled[min(i + 1, len(scaled) - 1)]
                assert y in (a, b)
                assert abs(Fraction(x) - Fraction(y)) <= (Fraction(b) - Fraction(a)) / 2
                assert y == ref_nearest(x, scaled)  # and exact ties go to the smaller value


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.data())
def test_pack_unpack_round_trip_every_width(bits, data):
    shape = data.draw(st.tuples(st.integers(1, 3), st.integers(0, 45)))  # several 8-code runs and a tail
    codes = data.draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)))
    packed = pack_codes(codes, bits)
    assert packed.shape == shape[:-1] + ((shape[-1] * bits + 7) // 8,)
    for r in range(shape[0]):
        assert bytes(packed[r]) == ref_pack(codes[r].tolist(), bits)
        assert ref_unpack(bytes(packed[r]), bits, shape[1]) == codes[r].tolist()
    assert np.array_equal(unpack_codes(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("name", ["bitmod-w3", "rtn-int4", "fp4"])
def test_matrix_groups_with_a_shorter_last_group(name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 576)).astype(np.float32)
    scheme = get_scheme(name)
    qm = quantize_matrix(w, scheme, 128)
    assert qm.codes.shape == (3, 576) and qm.scales.shape == (3, 5) and qm.scales.dtype == np.float16
    assert (qm.zeros is not None) == scheme.asymmetric and (qm.selectors is not None) == (name == "bitmod-w3")
    for g, cols in enumerate([slice(i, min(i + 128, 576)) for i in range(0, 576, 128)]):
        block = w[:, cols]
        for r in range(3):  # each group, the 64-wide last one included, fitted on its own weights
            row = block[r].tolist()
            if scheme.asymmetric:
                assert float(qm.scales[r, g]) == ref_asymmetric(row, [True] * len(row), 16)[0]
            else:
                sel, scale, _ = ref_symmetric_choice(row, [True] * len(row), REF_SCHEMES[name][2])
                assert float(qm.scales[r, g]) == scale
    deq = dequantize_matrix(qm, scheme, 128)
    assert deq.shape == w.shape and np.abs(deq - w).max() < np.abs(w).max() / 2


@FEW
@given(st.sampled_from([(2, 4), (4, 8), (1, 4), (3, 16), (8, 16)]), st.integers(1, 4), st.integers(1, 3),
       st.booleans(), st.data())
def test_nm_mask_keeps_exactly_n_of_every_m(nm, rows, blocks_per_row, use_scale, data):
    n, m = nm
    k = m * blocks_per_row
    w = data.draw(hnp.arrays(np.float32, (rows, k), elements=st.sampled_from([0.0, 1.0, -1.0, 2.0]) | weights))
    scale = data.draw(hnp.arrays(np.float32, (k,), elements=st.floats(0, 10, width=32))) if use_scale else None
    mask = nm_mask(w, n, m, scale)
    for r in range(rows):
        for b in range(0, k, m):
            score = [abs(float(w[r, j])) * (1.0 if scale is None else float(scale[j])) for j in range(b, b + m)]
            want = sorted(range(m), key=lambda j: (-score[j], j))[:n]  # largest, ties to lower index
            assert sorted(j for j in range(m) if mask[r, b + j]) == sorted(want)
    kept, index = compress_nm(w, mask, n, m)
    assert kept.shape == index.shape == (rows, k // m * n) and index.dtype == np.uint8
    for r in range(rows):
        for i in range(kept.shape[1]):
            col = (i // n) * m + int(index[r, i])
            assert mask[r, col] and kept[r, i] == w[r, col]
            if i % n:
                assert index[r, i] > index[r, i - 1]  # ascending inside a block
    assert np.array_equal(expand_nm(kept, index, n, m, k), np.where(mask, w, 0))


def test_nm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of M"):
        nm_mask(np.ones((2, 6), np.float32), 2, 4)
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        compress_nm(np.ones((1, 4), np.float32), np.array([[True, True, True, False]]), 2, 4)


@FEW
@given(st.sampled_from(["bitmod-w3", "rtn-int3", "fp4"]), st.floats(0.001, 0.3), st.booleans(), st.data())
def test_select_outliers_takes_the_largest_impact(name, fraction, weighted, data):
    w = data.draw(hnp.arrays(np.float32, (4, 24), elements=weights))
    importance = data.draw(hnp.arrays(np.float64, (24,), elements=st.floats(0, 5))) if weighted else None
    scheme = get_scheme(name)
    mask = select_outliers(w, scheme, 8, fraction, importance)
    assert mask.sum() == math.ceil(fraction * w.size - 1e-9)
    rtn = dequantize_matrix(quantize_matrix(w, scheme, 8), scheme, 8)
    impact = [(float(w[r, c]) - float(rtn[r, c])) ** 2 * (1.0 if importance is None else importance[c])
              for r in range(4) for c in range(24)]
    chosen = [i for i, flag in enumerate(mask.reshape(-1)) if flag]
    order = sorted(range(len(impact)), key=lambda i: (-impact[i], i))  # largest, ties earliest
    assert chosen == sorted(order[:len(chosen)])
