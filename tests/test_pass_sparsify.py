"""Pass ``sparsify``: N:M pruning of linear weights, and N:M weights through ``quantize``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import evaluate
from bitsmith.passes import Quantize, Sparsify
from pass_checks import run_passes
from quant_modules import DOWN, HEAD, UP, dense_equivalent, mlp_module, nodes_of, operands_of
from quant_reference import ref_dequantize


def weight_of(module, node) -> np.ndarray:
    return module.tensors[module.functions[0].producers()[node.inputs[1]].attr("name")]


def test_before_after_ir_example():
    before = mlp_module()
    after = run_passes(before, Sparsify(pattern="2:4"))
    up, down, head = nodes_of(after, "linear")
    assert (up.attr("sparsity"), down.attr("sparsity"), head.attr("sparsity")) == ("2:4", "2:4", None)
    assert set(after.tensors) == {f"{UP}.weight.nm2_4", f"{DOWN}.weight.nm2_4", f"{UP}.bias", f"{HEAD}.weight"}
    w_before, w_after = before.tensors[f"{UP}.weight"], weight_of(after, up)
    assert np.array_equal(w_after != 0, np.abs(w_before) >= np.sort(np.abs(w_before).reshape(16, 8, 4), -1)
                          [..., 2:3].repeat(4, -1).reshape(16, 32))  # the two largest of every four
    assert run_passes(after, Sparsify(pattern="2:4")) == after  # idempotent
    with pytest.raises(ValueError, match="already 2:4 sparse"):
        Sparsify(pattern="4:8").apply(after)


def scalar_nm_keep(w: np.ndarray, n: int, m: int, scale) -> np.ndarray:
    keep = np.zeros(w.shape, dtype=bool)
    for r in range(w.shape[0]):
        for b in range(0, w.shape[1], m):
            score = [abs(float(w[r, j])) * (1.0 if scale is None else float(scale[j])) for j in range(b, b + m)]
            for j in sorted(range(m), key=lambda j: (-score[j], j))[:n]:
                keep[r, b + j] = True
    return keep


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["2:4", "4:8", "1:4", "5:16"]), st.sampled_from(["magnitude", "activation"]),
       st.integers(0, 2 ** 16))
def test_keeps_exactly_n_of_every_m_by_score(pattern, method, seed):
    n, m = (int(p) for p in pattern.split(":"))
    before = mlp_module(k=32, seed=seed)
    norms = {}

    def calibration(module):
        rng = np.random.default_rng(seed + 1)
        for node in nodes_of(module, "linear"):
            norms[node.inputs[0]] = rng.uniform(0, 3, weight_of(module, node).shape[1])
        return norms

    after = run_passes(before, Sparsify(pattern=pattern, method=method, calibration=calibration))
    for b_node, a_node in zip(nodes_of(before, "linear"), nodes_of(after, "linear")):
        w, pruned = weight_of(before, b_node), weight_of(after, a_node)
        if b_node.loc.module_path == HEAD:
            assert pruned is w or np.array_equal(pruned, w)
            continue
        keep = scalar_nm_keep(w, n, m, norms.get(b_node.inputs[0]) if method == "activation" else None)
        assert (keep.reshape(w.shape[0], -1, m).sum(-1) == n).all()
        assert np.array_equal(pruned, np.where(keep, w, 0))


def test_activation_needs_calibration_and_bad_patterns_fail():
    with pytest.raises(ValueError, match="method=activation} needs calibration"):
        Sparsify(method="activation").apply(mlp_module())
    with pytest.raises(ValueError, match="not N:M"):
        Sparsify(pattern="2-4")
    with pytest.raises(ValueError, match="power of two"):
        Sparsify(pattern="2:6")
    with pytest.raises(ValueError, match="unknown method"):
        Sparsify(method="random")
    with pytest.raises(ValueError, match="up_proj.*multiple of M = 16"):
        Sparsify(pattern="2:16", layers=(UP,)).apply(mlp_module(k=24))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["2:4", "4:8", "8:16"]), st.sampled_from(["bitmod-w3", "rtn-int4", "fp4"]),
       st.sampled_from([4, 8, 16]), st.integers(0, 2 ** 16))
def test_quantized_nm_weights_equal_dense_matmul(pattern, scheme, group_size, seed):
    """Sparsify then quantize: the qlinear stores only the kept weights and their in-block
    indices (bits accounted below); its output equals x @ W.T with W decoded by the scalar
    reference (tolerance: float32 summation order only, 1e-5 relative to the largest output)."""
    n, m = (int(p) for p in pattern.split(":"))
    sparse = run_passes(mlp_module(k=32, seed=seed), Sparsify(pattern=pattern))
    after = run_passes(sparse, Quantize(scheme=scheme, group_size=group_size))
    for node in nodes_of(after, "qlinear"):
        attrs = node.attr_dict
        arrays = operands_of(after, node)[:len(node.inputs) - 1 - attrs["bias"]]
        k, out = attrs["in_features"], attrs["out_features"]
        kept = k // m * n
        assert arrays[-1].shape == (out, (kept * int(np.log2(m)) + 7) // 8)  # nm_index, log2(M) bits each
        weight = ref_dequantize(attrs, arrays)
        assert (np.count_nonzero(weight.reshape(out, -1, m), axis=-1) <= n).all()
        pruned = sparse.tensors[f"{node.loc.module_path}.weight.nm{n}_{m}"]
        assert not np.any((weight != 0) & ~scalar_nm_keep(pruned, n, m, None))  # pruned stays zero
    x = np.random.default_rng(seed).standard_normal((3, 32)).astype(np.float32)
    dense = dense_equivalent(after, ref_dequantize)
    (got,), (want,) = evaluate(after, [x]), evaluate(dense, [x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
