"""The ``bcq_linear`` op (bitsmith/ir/bcq.py): reference meaning against an independent scalar
implementation, packed planes round-trip, verifier refusals, stored bits per weight, text and
artifact round-trips, and the tvm-llvm kernel against the reference."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bitsmith.ir import GraphBuilder, TensorType, parse_module, print_module, run_function, verify_module
from bitsmith.ir.bcq import (ZERO_EXPONENT, check_scales, dequantize, pack_planes, storage_bits_per_weight,
                             unpack_planes)
from bitsmith.ir.types import IRTypeError

HAS_TVM = importlib.util.find_spec("tvm") is not None


def random_operands(rng: np.random.Generator, bits: int, n: int, k: int, gs: int, scale: str):
    """(signs int8 [bits, n, k], scales operand) drawn at random, zero terms included."""
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), (bits, n, k))
    g = -(-k // gs)
    if scale == "fp16":
        scales = rng.uniform(0, 2, (bits, n, g)).astype(np.float16)
    else:
        shape = (bits, n, g) if scale == "pow2" else (bits, n, g, 2)
        scales = rng.integers(-20, 5, shape).astype(np.int8)
        scales[rng.random(shape) < 0.1] = ZERO_EXPONENT
    return signs, scales


def random_offsets(rng: np.random.Generator, n: int, k: int, gs: int) -> np.ndarray:
    """int8 offset units [n, groups], the fit's range (odd, |c| < 2^bits) and beyond."""
    return rng.integers(-20, 21, (n, -(-k // gs))).astype(np.int8)


def scalar_weight(signs, scales, scale: str, gs: int, offsets=None) -> np.ndarray:
    """W[n, k] = c * alpha_last + sum_i alpha_i * s_i by loops and Python floats: the oracle,
    written apart from bcq.py."""
    bits, n, k = signs.shape
    w = np.zeros((n, k), dtype=np.float64)

    def term(e):
        return 0.0 if int(e) == -128 else math.ldexp(1.0, int(e))

    def alpha(i, r, c):
        s = scales[i, r, c // gs]
        return float(s) if scale == "fp16" else (term(s) if scale == "pow2" else term(s[0]) + term(s[1]))
    for r in range(n):
        for c in range(k):
            for i in range(bits):
                w[r, c] += alpha(i, r, c) * int(signs[i, r, c])
            if offsets is not None:
                w[r, c] += int(offsets[r, c // gs]) * alpha(bits - 1, r, c)
    return w


def bcq_module(signs, scales, scale: str, gs: int, x_shape, bias=None, x_dtype="float32", offsets=None):
    bits, n, k = signs.shape
    b = GraphBuilder()
    x = b.param("x", TensorType(tuple(x_shape), x_dtype))
    inputs = [x, b.constant("w.planes", pack_planes(signs)), b.constant("w.scales", scales)]
    if offsets is not None:
        inputs.append(b.constant("w.offsets", offsets))
    if bias is not None:
        inputs.append(b.constant("w.bias", bias))
    attrs = dict(bits=bits, group_size=gs, in_features=k, out_features=n, scale=scale, bias=bias is not None)
    if offsets is not None:
        attrs["offset"] = True
    return b.module([b.op("bcq_linear", inputs, attrs)]), attrs


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 4), n=st.integers(1, 5), k=st.integers(1, 40), gs=st.sampled_from([1, 3, 8, 16, 32]),
       scale=st.sampled_from(["pow2", "apot2", "fp16"]), bias=st.booleans(), offset=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_op_equals_dense_matmul_with_the_reconstructed_weight(bits, n, k, gs, scale, bias, offset, seed):
    """Tolerance: the interpreter rounds the float32 weight once (<= 2^-24 relative per weight)
    and the result once (float32): |y - x W^T| <= 2^-22 * (|x| |W|^T) covers both with margin."""
    rng = np.random.default_rng(seed)
    signs, scales = random_operands(rng, bits, n, k, gs, scale)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    c = random_offsets(rng, n, k, gs) if offset else None
    module, attrs = bcq_module(signs, scales, scale, gs, (2, 3, k), b, offsets=c)
    verify_module(module)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    w = scalar_weight(signs, scales, scale, gs, c)
    want = x.astype(np.float64) @ w.T + (0 if b is None else b.astype(np.float64))
    got = run_function(module, "main", [x])[0]
    assert got.shape == (2, 3, n) and got.dtype == np.float32
    bound = 2.0 ** -22 * (np.abs(x).astype(np.float64) @ np.abs(w).T + (0 if b is None else np.abs(b)))
    assert (np.abs(got - want) <= bound + 1e-30).all()
    operands = [pack_planes(signs), scales] + ([c] if offset else [])
    np.testing.assert_array_equal(dequantize(attrs, operands), w.astype(np.float32))


@settings(max_examples=50, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 4), k=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_planes_round_trip(bits, n, k, seed):
    signs = np.random.default_rng(seed).choice(np.array([-1, 1], dtype=np.int8), (bits, n, k))
    packed = pack_planes(signs)
    assert packed.dtype == np.uint8 and packed.shape == (bits, n, (k + 7) // 8)
    np.testing.assert_array_equal(unpack_planes(packed, k), signs)
    if k % 8:  # padding bits past in_features are 0
        assert (packed[..., -1] >> (k % 8) == 0).all()


def test_pack_planes_refuses_non_signs():
    with pytest.raises(ValueError, match="only -1 and \\+1"):
        pack_planes(np.zeros((1, 2, 3), np.int8))
    with pytest.raises(ValueError, match="\\[bits, out, in\\]"):
        pack_planes(np.ones((2, 3), np.int8))


def _node_types(bits=2, n=3, k=10, gs=4, scale="pow2"):
    g = -(-k // gs)
    planes = TensorType((bits, n, (k + 7) // 8), "uint8")
    scales = {"pow2": TensorType((bits, n, g), "int8"), "apot2": TensorType((bits, n, g, 2), "int8"),
              "fp16": TensorType((bits, n, g), "float16")}[scale]
    attrs = dict(bits=bits, group_size=gs, in_features=k, out_features=n, scale=scale, bias=False)
    return TensorType((5, k), "float32"), planes, scales, attrs


@pytest.mark.parametrize("change, words", [
    (lambda x, p, s, a: (x, TensorType((2, 3, 1), "uint8"), s, a), "operand planes has type"),
    (lambda x, p, s, a: (x, p, TensorType(s.shape, "float16"), a), "operand exponents has type"),
    (lambda x, p, s, a: (x, p, s, {**a, "scale": "apot2"}), "operand exponents has type"),
    (lambda x, p, s, a: (x, p, s, {**a, "scale": "fp16"}), "operand alphas has type"),
    (lambda x, p, s, a: (x, p, s, {**a, "scale": "int4"}), "scale must be one of pow2, apot2, fp16"),
    (lambda x, p, s, a: (x, p, s, {**a, "bits": 9}), "bits must be in 1..8"),
    (lambda x, p, s, a: (x, p, s, {**a, "group_size": 0}), "group_size must be a positive int"),
    (lambda x, p, s, a: (TensorType((5, 11), "float32"), p, s, a), "input features"),
    (lambda x, p, s, a: (TensorType((5, 10), "int8"), p, s, a), "activations must be float"),
    (lambda x, p, s, a: (x, p, s, {**a, "bias": True}), "expected 4 operands"),
    (lambda x, p, s, a: (x, p, s, {**a, "offset": True}), "expected 4 operands \\(x, planes, exponents, offsets\\)"),
    (lambda x, p, s, a: (x, p, s, {**a, "offset": 1}), "offset must be a bool"),
])
def test_verifier_refusals(change, words):
    from bitsmith.ir.ops import get_op
    x, p, s, a = change(*_node_types())
    with pytest.raises(IRTypeError, match=words):
        get_op("bcq_linear").infer((x, p, s), a)


def test_verifier_refuses_a_bias_of_another_dtype():
    from bitsmith.ir.ops import get_op
    x, p, s, a = _node_types()
    with pytest.raises(IRTypeError, match="bias must be float32\\[3\\]"):
        get_op("bcq_linear").infer((x, p, s, TensorType((3,), "float16")), {**a, "bias": True})


def test_check_scales_refuses_exponents_outside_float32_normals():
    attrs = dict(scale="pow2")
    check_scales(attrs, np.array([-126, 127, ZERO_EXPONENT], np.int8))
    with pytest.raises(ValueError, match="exponents must lie in"):
        check_scales(attrs, np.array([-127], np.int8))
    with pytest.raises(ValueError, match="finite and >= 0"):
        check_scales(dict(scale="fp16"), np.array([-1.0], np.float16))


@pytest.mark.parametrize("scale, scale_bytes", [("pow2", 1), ("apot2", 2), ("fp16", 2)])
@pytest.mark.parametrize("k, gs", [(64, 32), (20, 8), (576, 128)])
@pytest.mark.parametrize("offset", [False, True])
def test_bits_per_weight_counts_every_stored_byte(scale, scale_bytes, k, gs, offset):
    bits, n = 3, 5
    rng = np.random.default_rng(0)
    signs, scales = random_operands(rng, bits, n, k, gs, scale)
    c = random_offsets(rng, n, k, gs) if offset else None
    module, attrs = bcq_module(signs, scales, scale, gs, (1, k), np.zeros(n, np.float32), offsets=c)
    stored = bits * n * ((k + 7) // 8) + bits * n * (-(-k // gs)) * scale_bytes  # bias never counts
    stored += n * (-(-k // gs)) if offset else 0  # one int8 offset per row and group
    assert storage_bits_per_weight(attrs) == pytest.approx(8 * stored / (n * k))
    from bitsmith.runtime.model import linear_storage
    assert linear_storage(module) == (stored, n * k, 1)


def test_text_form_round_trips():
    signs, scales = random_operands(np.random.default_rng(1), 2, 3, 12, 4, "apot2")
    module, _ = bcq_module(signs, scales, "apot2", 4, ("batch", 12))
    text = print_module(module)
    assert "bcq_linear" in text
    again = parse_module(text, module.tensors)
    assert print_module(again) == text


@pytest.mark.parametrize("target", ["reference"] + (["tvm-llvm"] if HAS_TVM else []))
def test_artifact_round_trip(target, tmp_path):
    """Saved and loaded: the same outputs, op and bits per layer (planes and exponents are plain
    safetensors tensors: nothing is unpickled)."""
    import bitsmith
    from bitsmith.backends import backend_for_target
    from bitsmith.runtime import CompiledModel
    rng = np.random.default_rng(3)
    signs, scales = random_operands(rng, 3, 6, 40, 16, "apot2")
    module, _ = bcq_module(signs, np.clip(scales, -8, 2).astype(np.int8), "apot2", 16, ("batch", 40),
                           rng.standard_normal(6).astype(np.float32), offsets=random_offsets(rng, 6, 40, 16))
    backend = backend_for_target(target)
    options = backend.option_defaults(target)
    cm = CompiledModel(module, backend.build(module, target, options), target, options)
    cm.save(str(tmp_path / "a"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    x = rng.standard_normal((3, 40)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), cm(x).numpy())
    assert loaded.report()["op_counts"] == {"bcq_linear": 1, "constant": 4}
    assert loaded.report()["bits_per_layer"] == {"v4": 3}


@pytest.mark.skipif(not HAS_TVM, reason="apache-tvm not installed")
@pytest.mark.parametrize("offset", [False, True])
@settings(max_examples=4, deadline=None)
@given(bits=st.integers(1, 4), k=st.sampled_from([8, 37, 56, 64]), gs=st.sampled_from([8, 16, 32]),
       scale=st.sampled_from(["pow2", "apot2", "fp16"]), m=st.integers(1, 5), seed=st.integers(0, 1000))
def test_tvm_llvm_kernel_equals_the_reference(bits, k, gs, scale, m, offset, seed):
    """Within the tvm backend's Tolerance (float32 sums in another order than the oracle)."""
    from bitsmith.backends import backend_for_target
    rng = np.random.default_rng(seed)
    signs, scales = random_operands(rng, bits, 6, k, gs, scale)
    if scale != "fp16":
        scales = np.where(scales == ZERO_EXPONENT, scales, np.clip(scales, -8, 2)).astype(np.int8)
    c = random_offsets(rng, 6, k, gs) if offset else None
    module, _ = bcq_module(signs, scales, scale, gs, ("batch", k), rng.standard_normal(6).astype(np.float32),
                           offsets=c)
    tvm_backend, ref = backend_for_target("tvm-llvm"), backend_for_target("reference")
    opts = tvm_backend.option_defaults("tvm-llvm")
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = tvm_backend.build(module, "tvm-llvm", opts).run("main", [x])
    want = ref.build(module, "reference", {}).run("main", [x])
    assert tvm_backend.tolerance("tvm-llvm", opts).compare(got, want) is None


@pytest.mark.skipif(not HAS_TVM, reason="apache-tvm not installed")
@pytest.mark.parametrize("scale", ["pow2", "apot2", "fp16"])
@settings(max_examples=6, deadline=None)
@example(bits=3, span=9, gs=64, groups=2, ragged=10, offset=True, zeros=False, m=1, seed=1)  # wide spans: float path
@example(bits=4, span=2, gs=64, groups=3, ragged=40, offset=True, zeros=True, m=2, seed=2)  # byte codes, q = 4 and 1
@given(bits=st.integers(1, 5), span=st.integers(0, 9), gs=st.sampled_from([16, 32, 64]), groups=st.integers(1, 3),
       ragged=st.integers(0, 63), offset=st.booleans(), zeros=st.booleans(), m=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_tvm_llvm_vector_kernel_against_a_scalar_oracle(scale, bits, span, gs, groups, ragged, offset, zeros, m, seed):
    """The hand-vectorized kernel (bcq_cpu.py) against ``scalar_weight`` (loops, float64), with
    x @ W.T in float64. pow2 groups whose exponents span few octaves take the byte-code path,
    wider spans (or apot2/fp16) the float path: ``span`` draws both, ``ragged`` a short last
    group and a k that is no multiple of 16, ``zeros`` zero terms. Tolerance: the tvm backend's
    (float32 sums in another order than the oracle; see its ``tolerance``)."""
    from bitsmith.backends import backend_for_target
    rng = np.random.default_rng(seed)
    n, k = 11, max(1, (groups - 1) * gs + ragged % gs + (gs if ragged < gs // 2 else 0))
    g = -(-k // gs)
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), (bits, n, k))
    shape = (bits, n, g) if scale != "apot2" else (bits, n, g, 2)
    exps = rng.integers(-12, 3, (1, n, g) + shape[3:]) + rng.integers(0, span + 1, shape)
    if zeros:
        exps[rng.random(shape) < 0.2] = ZERO_EXPONENT
    scales = np.ldexp(1.0, exps).astype(np.float16) if scale == "fp16" else exps.astype(np.int8)
    c = random_offsets(rng, n, k, gs) if offset else None
    module, _ = bcq_module(signs, scales, scale, gs, ("batch", k), offsets=c)
    tvm_backend = backend_for_target("tvm-llvm")
    opts = tvm_backend.option_defaults("tvm-llvm")
    cm = tvm_backend.build(module, "tvm-llvm", opts)
    schedules = str(cm.info["kernel_schedules"])
    assert "vector-bcq" in schedules and "generic" not in schedules, schedules
    x = rng.standard_normal((m, k)).astype(np.float32)
    want = (x.astype(np.float64) @ scalar_weight(signs, scales, scale, gs, c).T).astype(np.float32)
    assert tvm_backend.tolerance("tvm-llvm", opts).compare(cm.run("main", [x]), [want]) is None


def test_mlir_export_keeps_bcq_linear_in_generic_form():
    pytest.importorskip("torch_mlir")
    from bitsmith.mlir.export import export_module
    signs, scales = random_operands(np.random.default_rng(4), 2, 4, 16, 8, "pow2")
    module, _ = bcq_module(signs, scales, "pow2", 8, ("batch", 16))
    line = next(line for line in export_module(module).splitlines() if "bcq_linear" in line)
    assert '"bitsmith.bcq_linear"' in line and 'scale = "pow2"' in line and "tensor<2x4x2xui8>" in line
