"""Pass ``outliers`` (annotation) and the SpQR-style extraction ``quantize`` does for it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.passes import MarkOutliers, Quantize, Sparsify, get_pass
from pass_checks import run_passes
from quant_modules import DOWN, HEAD, UP, mlp_module, nodes_of, operands_of
from quant_reference import SCHEMES as REF_SCHEMES
from quant_reference import fp16, ref_asymmetric, ref_dequantize, ref_symmetric_choice


def test_before_after_ir_example():
    before = mlp_module()
    after = run_passes(before, MarkOutliers(fraction=0.01))
    assert [n.attr("outliers") for n in nodes_of(after, "linear")] == [0.01, 0.01, None]  # not lm_head
    assert after.tensors == before.tensors  # annotation only: quantize extracts
    assert run_passes(after, MarkOutliers(fraction=0.01)) == after
    cleared = run_passes(after, MarkOutliers(fraction=0.0))
    assert [n.attr("outliers") for n in nodes_of(cleared, "linear")] == [None] * 3
    assert get_pass("outliers", fraction=0.02, layers=(DOWN,)) == MarkOutliers(0.02, (DOWN,))
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        MarkOutliers(fraction=1.5)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(["bitmod-w3", "fp4", "rtn-int3", "rtn-int2-sym"]), st.sampled_from([0.005, 0.03, 0.2]),
       st.sampled_from([8, 12]), st.booleans(), st.integers(0, 2 ** 16))
def test_outliers_restore_exact_fp16_values_and_groups_refit_without_them(scheme, fraction, group_size,
                                                                            sparse, seed):
    rng = np.random.default_rng(seed)
    up = rng.standard_normal((16, 32)).astype(np.float32)
    up[rng.integers(0, 16, 3), rng.integers(0, 32, 3)] *= 40  # a few real outliers
    module = mlp_module(k=32, seed=seed, weights={UP: up})
    passes = ([Sparsify(pattern="2:4", layers=(UP,))] if sparse else []) + [
        MarkOutliers(fraction=fraction, layers=(UP,)), Quantize(scheme=scheme, group_size=group_size)]
    before_quant = run_passes(module, *passes[:-1])
    after = run_passes(before_quant, passes[-1])
    w = before_quant.tensors[f"{UP}.weight.nm2_4" if sparse else f"{UP}.weight"]
    node = [n for n in nodes_of(after, "qlinear") if n.loc.module_path == UP][0]
    attrs = node.attr_dict
    assert attrs["outliers"] == fraction
    arrays = operands_of(after, node)[:-1]  # without the bias
    values, cols, rowptr = arrays[-3:]
    assert (values.dtype, cols.dtype, rowptr.dtype) == (np.float16, np.int32, np.int32)
    kept = w.size // 2 if sparse else w.size
    assert len(values) == math.ceil(fraction * kept - 1e-9) == rowptr[-1] and rowptr[0] == 0
    assert (np.diff(rowptr) >= 0).all()
    decoded = ref_dequantize(attrs, arrays)
    outlier = np.zeros(w.shape, dtype=bool)
    for r in range(16):
        for i in range(rowptr[r], rowptr[r + 1]):
            c = int(cols[i])
            outlier[r, c] = True
            assert values[i] == np.float16(w[r, c])  # the exact fp16 value ...
            assert decoded[r, c] == np.float32(np.float16(w[r, c]))  # ... is what the layer computes with
            if sparse:
                assert w[r, c] != 0 or not np.any(w[r, (c // 4) * 4:(c // 4) * 4 + 4] != 0)
    # every group of the kept weights was fitted without its outliers
    _, asym, grids = REF_SCHEMES[scheme]
    for r in range(16):
        row_cols = [c for c in range(32) if not sparse or c in _kept_cols(w[r])]
        scales = arrays[1][r]
        for g, start in enumerate(range(0, len(row_cols), group_size)):
            cs = row_cols[start:start + group_size]
            row, keep = [float(w[r, c]) for c in cs], [not outlier[r, c] for c in cs]
            if asym:
                want = ref_asymmetric(row, keep, 1 << REF_SCHEMES[scheme][0])[0]
            else:
                want = ref_symmetric_choice(row, keep, grids)[1]
            assert float(scales[g]) == want


def _kept_cols(row: np.ndarray) -> list[int]:
    """Columns a 2:4 compression keeps: the two largest |w| of each block, ties to the lower."""
    out = []
    for b in range(0, len(row), 4):
        out += sorted(sorted(range(b, b + 4), key=lambda c: (-abs(float(row[c])), c))[:2])
    return out


def test_outliers_lower_the_reconstruction_error():
    rng = np.random.default_rng(0)
    up = rng.standard_normal((16, 32)).astype(np.float32)
    up[3, 5] = 60.0
    plain = run_passes(mlp_module(weights={UP: up}), Quantize(scheme="fp3", group_size=8, layers=(UP,)))
    kept = run_passes(mlp_module(weights={UP: up}), MarkOutliers(0.01, (UP,)), Quantize(scheme="fp3", group_size=8))
    err = []
    for m in (plain, kept):
        node = nodes_of(m, "qlinear")[0]
        decoded = ref_dequantize(node.attr_dict, operands_of(m, node)[:-1])
        err.append(np.square(decoded[3, :8] - up[3, :8]).sum())  # the outlier's group
    assert err[1] < err[0] / 10
    assert fp16(60.0) == 60.0 and nodes_of(kept, "qlinear")[0].loc.module_path == UP
    assert HEAD not in [n.loc.module_path for n in nodes_of(kept, "qlinear")]
