"""Pass ``quantize``: linear -> qlinear on packed constants, checked against the scalar decoder
of quant_reference and the reference interpreter."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.errors import PassError
from bitsmith.ir import GraphBuilder, Location, TensorType, evaluate, print_module
from bitsmith.ir.quant_grids import fitted_schemes
from bitsmith.ir.quantized import dequantize
from bitsmith.passes import PassManager, Quantize, get_pass, parse_pass_spec
from bitsmith.passes.quantization import quantize_matrix, select_outliers
from pass_checks import run_passes
from quant_modules import DOWN, HEAD, UP, dense_equivalent, mlp_module, nodes_of, operands_of
from quant_reference import SCHEMES as REF_SCHEMES
from quant_reference import ref_dequantize

def test_before_after_ir_example():
    before = mlp_module()
    after = run_passes(before, Quantize(scheme="bitmod-w3", group_size=8))

    ops = [n.op for n in after.functions[0].nodes]
    assert ops.count("qlinear") == 2 and ops.count("linear") == 1  # lm_head stays fp32
    up, down = nodes_of(after, "qlinear")
    assert up.attr_dict == {"scheme": "bitmod-w3", "group_size": 8, "in_features": 32, "out_features": 16,
                            "sparsity": "", "outliers": 0.0, "bias": True}
    assert up.loc.module_path == UP and down.loc.module_path == DOWN
    producers = after.functions[0].producers()
    assert [producers[i].attr("name") for i in up.inputs[1:]] == [
        f"{UP}.weight.codes", f"{UP}.weight.scales", f"{UP}.weight.selectors", f"{UP}.bias"]
    assert set(after.tensors) == {f"{p}.weight.{r}" for p in (UP, DOWN) for r in ("codes", "scales", "selectors")} \
        | {f"{UP}.bias", f"{HEAD}.weight"}  # the fp32 weights left the table
    text = print_module(after)
    assert "qlinear" in text and "bitmod-w3" in text
    assert len(nodes_of(before, "linear")) == 3 and f"{UP}.weight" in before.tensors  # input untouched
    assert run_passes(after, Quantize(scheme="bitmod-w3", group_size=8)) == after  # nothing left to quantize


@pytest.mark.parametrize("name", sorted(fitted_schemes()))
def test_operand_shapes_and_bits(name):
    """K = 576 in groups of 128: 5 groups, the last one 64 wide."""
    module = run_passes(mlp_module(k=576, hidden=8), Quantize(scheme=name, layers=(UP,)))
    (node,) = nodes_of(module, "qlinear")
    bits, asym, grids = REF_SCHEMES[name]
    arrays = operands_of(module, node)[:-1]  # without the bias
    want = [((8, math.ceil(576 * bits / 8)), "uint8"), ((8, 5), "float16")]
    want += [((8, 5), "uint8")] if asym else []
    want += [((8, math.ceil(5 * 2 / 8)), "uint8")] if len(grids) > 1 else []
    assert [(a.shape, str(a.dtype)) for a in arrays] == want
    stored_bits = 8 * sum(a.nbytes for a in arrays) / (8 * 576)
    assert stored_bits == pytest.approx(bits + (16 + 8 * asym + 2 * (len(grids) > 1)) * 5 / 576, abs=8 / 576)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(fitted_schemes())), st.sampled_from([4, 5, 8, 32, 128]), st.sampled_from([8, 24, 40]),
       st.integers(0, 2 ** 16))
def test_qlinear_equals_dense_matmul_with_dequantized_weights(name, group_size, k, seed):
    """The interpreter's qlinear equals x @ W.T with W decoded by the scalar reference.

    Tolerance: both sides are float32 matmuls of the same weights, so only the summation order
    may differ: 1e-5 relative to the largest output (K <= 40 products, float32 eps 6e-8)."""
    before = mlp_module(k=k, seed=seed)
    after = run_passes(before, Quantize(scheme=name, group_size=group_size, layers=(UP, DOWN, HEAD)))
    x = np.random.default_rng(seed).standard_normal((3, k)).astype(np.float32)
    for node in nodes_of(after, "qlinear"):
        arrays = operands_of(after, node)
        weights = arrays[:-1] if node.attr("bias") else arrays
        ref = ref_dequantize(node.attr_dict, weights)
        assert np.array_equal(dequantize(node.attr_dict, weights), ref)  # the IR's decoder agrees
    dense = dense_equivalent(after, ref_dequantize)
    (got,), (want,) = evaluate(after, [x]), evaluate(dense, [x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_scheme_and_option_errors_list_valid_values():
    with pytest.raises(ValueError, match="unknown quantization scheme 'int5'; valid: rtn-int2, rtn-int2-sym, .*bitmod-w4"):
        get_pass("quantize", scheme="int5")
    with pytest.raises(ValueError, match="quantize needs scheme=NAME; valid: .*bitmod-w4"):
        get_pass("quantize")
    with pytest.raises(ValueError, match="group_size"):
        Quantize(scheme="fp4", group_size=0)
    (p,) = parse_pass_spec("quantize{scheme=bitmod-w3,group_size=64,layers='*.up_proj *.down_proj'}")
    assert p == Quantize(scheme="bitmod-w3", group_size=64, layers=("*.up_proj", "*.down_proj"))


def test_layer_globs_select_by_module_path():
    after = run_passes(mlp_module(), Quantize(scheme="fp4", group_size=8, layers=("*.up_proj",)))
    assert [n.loc.module_path for n in nodes_of(after, "qlinear")] == [UP]
    after = run_passes(mlp_module(), Quantize(scheme="fp4", group_size=8, layers=f"{DOWN} lm_*"))
    assert [n.loc.module_path for n in nodes_of(after, "qlinear")] == [DOWN, HEAD]


def test_shared_weight_is_quantized_once():
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 8), "float32"))
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    c = b.constant("shared.weight", w)
    y = b.op("linear", [b.op("linear", [x, c], loc=Location("a")), c], loc=Location("b"))
    after = run_passes(b.module([y]), Quantize(scheme="rtn-int4", group_size=4))
    assert sorted(after.tensors) == ["shared.weight.codes", "shared.weight.scales", "shared.weight.zeros"]
    assert len(nodes_of(after, "qlinear")) == 2


class Stats(types.SimpleNamespace):
    """What GPTQ calibration hands the pass for one linear input."""


@pytest.fixture
def fake_gptq(monkeypatch):
    """A stand-in gptq_quantize_matrix (RTN) that records its calls; the GPTQ numerics are
    tested with gptq.py itself."""
    calls = []

    def gptq_quantize_matrix(w, hessian, scheme, group_size, mask=None, **options):
        calls.append((w.copy(), hessian, mask))
        return quantize_matrix(w, scheme, group_size, mask)

    module = types.ModuleType("bitsmith.passes.quantization.gptq")
    module.gptq_quantize_matrix = gptq_quantize_matrix
    monkeypatch.setitem(sys.modules, "bitsmith.passes.quantization.gptq", module)
    return calls


def calibration_for(module):
    stats = {}
    for node in nodes_of(module, "linear"):
        k = module.tensors[module.functions[0].producers()[node.inputs[1]].attr("name")].shape[1]
        h = np.diag(np.arange(1.0, k + 1.0) ** 4)
        stats[node.inputs[0]] = Stats(hessian=h, column_norms=np.sqrt(np.diag(h)))
    return stats


def test_calibrate_hands_hessian_and_outlier_mask_to_gptq(fake_gptq):
    before = run_passes(mlp_module(), get_pass("outliers", fraction=0.05, layers=(UP,)))
    after = run_passes(before, Quantize(scheme="bitmod-w4", group_size=8, calibrate=True,
                                        calibration=calibration_for))
    assert len(fake_gptq) == 2
    (w_up, h_up, mask_up), (_, _, mask_down) = fake_gptq
    assert np.array_equal(w_up, before.tensors[f"{UP}.weight"]) and h_up.shape == (32, 32)
    assert mask_down is None
    # outliers were chosen with the Hessian diagonal as importance, and left out of the fit
    want = select_outliers(w_up, fitted_schemes()["bitmod-w4"], 8, 0.05, np.diag(h_up))
    assert np.array_equal(~mask_up, want)
    up = nodes_of(after, "qlinear")[0]
    values, cols, rowptr = operands_of(after, up)[3:6]  # after codes, scales, selectors
    rows = np.repeat(np.arange(16), np.diff(rowptr))
    assert np.array_equal(np.argwhere(want), np.stack([rows, cols], axis=1))


def test_calibrate_errors(fake_gptq):
    with pytest.raises(ValueError, match="calibrate=true} needs calibration"):
        Quantize(scheme="fp4", calibrate=True).apply(mlp_module())
    with pytest.raises(ValueError, match="no statistics for the input"):
        Quantize(scheme="fp4", calibrate=True, calibration=lambda m: {}).apply(mlp_module())
    sparse = run_passes(mlp_module(), get_pass("sparsify"))
    with pytest.raises(PassError, match="calibrate with N:M sparsity is not supported"):
        PassManager([Quantize(scheme="fp4", calibrate=True, calibration=calibration_for)]).run(sparse)


def test_hf_llama_quantized_logits():
    """Through a tiny random Llama: the quantized model is close to fp32 (loose: 4-bit weights)
    and equals the model whose linear weights are the dequantized ones (tight, 1e-5: the same
    float32 weights, only the matmul call differs)."""
    import bitsmith
    from bitsmith.backends import backend_for_target
    from bitsmith.runtime import CompiledModel
    from bitsmith.testing.hf_configs import make_model

    cm = bitsmith.compile(make_model("llama"))
    quantized = PassManager([Quantize(scheme="bitmod-w4", group_size=32)]).run(cm.module)
    assert len(nodes_of(quantized, "qlinear")) == 14 and len(nodes_of(quantized, "linear")) == 1

    def run(module):
        built = CompiledModel(module, backend_for_target("reference").build(module, "reference", cm.options),
                              "reference", cm.options, cm.lm)
        return built(np.random.default_rng(0).integers(0, 128, (2, 12))).numpy()

    ref, got, dense = run(cm.module), run(quantized), run(dense_equivalent(quantized, dequantize))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
