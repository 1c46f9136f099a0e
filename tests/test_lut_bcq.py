"""bcq_linear (binary-coded planes) on the LUT engine: code generation and both executors against
the op's reference meaning (the IR interpreter), fast vs reference executor bit for bit, the
int16 power-of-two path and its float fallback, refusals, and lut-cpu end to end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bitsmith
from bitsmith.backends.lut import isa, reference_executor, validate
from bitsmith.backends.lut.codegen import LayerProgram
from bitsmith.backends.lut.codegen_bcq import generate_bcq
from bitsmith.ir import run_function
from bitsmith.ir.bcq import ZERO_EXPONENT, alphas, pack_planes

from test_bcq_op import bcq_module, random_offsets, random_operands

from test_lut_executor import EPS32, fast, needs_avx2  # noqa: F401 - the per-build engine fixture


@st.composite
def bcq_layers(draw):
    bits = draw(st.integers(2, 4))
    scale = draw(st.sampled_from(["pow2", "apot2", "fp16"]))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    gs = 4 * draw(st.integers(1, 64))
    m = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    signs, scales = random_operands(rng, bits, n, k, gs, scale)   # exponents in [-20, 4]: spans past int16 too
    attrs = dict(bits=bits, group_size=gs, in_features=k, out_features=n, scale=scale, bias=False)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    return attrs, signs, scales, x


def _meaning(attrs, signs, scales, x):
    """The op's reference meaning: the IR interpreter on a one-node module."""
    module, _ = bcq_module(signs, scales, attrs["scale"], attrs["group_size"], x.shape)
    return run_function(module, "main", [x])[0].astype(np.float64)


def _bound(attrs, scales, x, table_group, int8):
    """|engine - meaning| bound per output. int8 tables: each entry is off by at most TS/2
    (TS = max|T| / 127 of its table block), a weight of plane i weighs 2 |alpha_i| (sign = 2b - 1),
    so block b adds at most TS_b / 2 * quads_b * sum_i 2 |alpha_i|. Float rounding: a first-order
    bound of K/4 + 16 rounded float32 terms, each at most the weighted magnitude (the 0/1 sums
    times 2 alpha plus the offset term, 3 sum_i |alpha_i| per activation)."""
    k, gs = attrs["in_features"], attrs["group_size"]
    a = np.abs(alphas(attrs, scales)).sum(axis=0)                        # [out, groups]
    gi = np.arange(k) // gs
    mag = np.abs(x).astype(np.float64) @ (3 * a[:, gi]).T
    bound = (k / 4 + 16) * EPS32 * mag + 1e-30
    if int8:
        kpad = 4 * -(-k // 4)
        xp = np.zeros((x.shape[0], kpad), np.float32)
        xp[:, :k] = x
        for g0 in range(0, k, gs):
            q0, q1 = g0 // 4, -(-min(g0 + gs, k) // 4)
            for b0 in range(q0, q1, table_group // 4):
                b1 = min(b0 + table_group // 4, q1)
                _, ts, _ = reference_executor.build_tables(xp[:, 4 * b0:4 * b1].reshape(x.shape[0], -1, 4), True)
                bound += (ts[:, None] / 2 * (b1 - b0)).astype(np.float64) * 2 * a[None, :, g0 // gs]
        bound *= 1 + 1e-5
    return bound


@settings(max_examples=50, deadline=None)
@given(bcq_layers(), st.booleans(), st.sampled_from([4, 32, 64, 256]))
def test_engine_equals_the_op_meaning_within_the_table_bound(layer, int8, table_group):
    attrs, signs, scales, x = layer
    prog = generate_bcq(attrs, [pack_planes(signs), scales], table_group)
    y = reference_executor.run(prog, x, int8_tables=int8)
    assert np.all(np.abs(y - _meaning(attrs, signs, scales, x)) <= _bound(attrs, scales, x, table_group, int8))


@needs_avx2
@settings(max_examples=40, deadline=None)
@given(bcq_layers(), st.booleans(), st.sampled_from([4, 32, 256]), st.sampled_from([1, 2]))
def test_fast_and_reference_executors_agree_bit_exactly(fast, layer, int8, table_group, threads):
    attrs, signs, scales, x = layer
    prog = generate_bcq(attrs, [pack_planes(signs), scales], table_group)
    assert np.array_equal(fast.run(prog, x, int8, threads=threads), reference_executor.run(prog, x, int8))


@settings(max_examples=40, deadline=None)
@given(bcq_layers(), st.booleans(), st.sampled_from([4, 32, 256]), st.integers(0, 2**32 - 1))
def test_group_offsets_ride_on_scale_and_match_the_op_meaning(layer, int8, table_group, seed):
    # bcq_linear's offset c * alpha_last per group (the zero point of shiftadd_offset) enters SCALE's
    # activation-sum coefficient; the oracle is the interpreter on the module with the offsets
    # operand, the bound _bound's plus the offset term's own float32 rounding (|c| |alpha_last|
    # weighs every activation once more)
    attrs, signs, scales, x = layer
    c = random_offsets(np.random.default_rng(seed), attrs["out_features"], attrs["in_features"], attrs["group_size"])
    attrs = {**attrs, "offset": True}
    prog = generate_bcq(attrs, [pack_planes(signs), scales, c], table_group)
    module, _ = bcq_module(signs, scales, attrs["scale"], attrs["group_size"], x.shape, offsets=c)
    want = run_function(module, "main", [x])[0].astype(np.float64)
    k, gs = attrs["in_features"], attrs["group_size"]
    off = np.abs(c.astype(np.float64) * alphas(attrs, scales)[-1])[:, np.arange(k) // gs]
    bound = _bound(attrs, scales, x, table_group, int8) + (k / 4 + 16) * EPS32 * (np.abs(x).astype(np.float64) @ off.T)
    assert np.all(np.abs(reference_executor.run(prog, x, int8_tables=int8) - want) <= bound)


def _kinds(prog: LayerProgram) -> set[int]:
    return set(isa.field_columns(prog.stream, "BCQMUL")["kind"].tolist())


def _layer(rng, scale, bits=3, n=40, k=256, gs=128, lo=-12, hi=-2):
    signs = rng.choice(np.array([-1, 1], np.int8), (bits, n, k))
    shape = (bits, n, -(-k // gs)) + ((2,) if scale == "apot2" else ())
    attrs = dict(bits=bits, group_size=gs, in_features=k, out_features=n, scale=scale, bias=False)
    return attrs, signs, rng.integers(lo, hi, shape).astype(np.int8)


@pytest.mark.parametrize("scale", ["pow2", "apot2"])
def test_power_of_two_scales_are_integer_shifts_without_a_float_fallback(scale):
    # exponents of a quantizer's range (span <= 13): every record is int16 (kind 0), and the
    # int16 weights are the powers of two 2**(e - emin + 1) (sums of two for apot2)
    rng = np.random.default_rng(0)
    attrs, signs, scales = _layer(rng, scale)
    prog = generate_bcq(attrs, [pack_planes(signs), scales])
    assert _kinds(prog) == {isa.BCQ_MUL_INT}
    words = prog.weights.reshape(-1, isa.WORD_BYTES)
    first = isa.field_columns(prog.stream, "TILE")["wptr"][0]
    w = reference_executor.bcq_plane_weights(words[first:first + 2], isa.BCQ_MUL_INT)   # tile 0, group 0, planes 0-1
    e = scales[:2, :16, 0].astype(np.int64)
    e_all = scales[:, :16, 0].reshape(attrs["bits"], 16, -1)
    emin = e_all.min(axis=(0, 2))
    want = (2.0 ** (e - (emin[:, None] if e.ndim == 3 else emin) + 1))
    want = want.sum(axis=-1) if scale == "apot2" else want
    assert np.array_equal(w.T.astype(np.float64), want)


@needs_avx2
def test_exponents_spanning_past_int16_fall_back_to_float_weights_exactly(fast):
    rng = np.random.default_rng(1)
    attrs, signs, scales = _layer(rng, "pow2", lo=-40, hi=0)   # spans up to 39: int16 cannot weigh them
    scales[0, :, :] = ZERO_EXPONENT                           # and a zero term in every row
    prog = generate_bcq(attrs, [pack_planes(signs), scales])
    assert isa.BCQ_MUL_FLOAT in _kinds(prog)
    x = rng.normal(size=(3, attrs["in_features"])).astype(np.float32)
    y = reference_executor.run(prog, x)
    assert np.array_equal(fast.run(prog, x, True, 2), y)
    assert np.all(np.abs(y - _meaning(attrs, signs, scales, x)) <= _bound(attrs, scales, x, 32, True))


@needs_avx2
def test_int8_activations_are_refused_for_binary_coded_planes_by_both_executors(fast):
    attrs, signs, scales = _layer(np.random.default_rng(2), "pow2", n=16, k=32, gs=32)
    prog = generate_bcq(attrs, [pack_planes(signs), scales])
    x = np.ones((1, 32), np.float32)
    with pytest.raises(validate.StreamError):
        reference_executor.run(prog, x, True, activation_bits=8)
    with pytest.raises(validate.StreamError):
        fast.run(prog, x, True, activation_bits=8)


@needs_avx2
def test_a_bcqacc_without_its_bcqmul_is_refused_the_same_by_both_validators(fast):
    attrs, signs, scales = _layer(np.random.default_rng(3), "pow2", n=16, k=32, gs=32)
    prog = generate_bcq(attrs, [pack_planes(signs), scales])
    stream = prog.stream.copy()
    ops = stream & np.uint64(0xFF)
    first_mul = int(np.flatnonzero(ops == isa.FORMATS["BCQMUL"].opcode)[0])
    # make the tile's first BCQMUL set slot 3, which no BCQACC of this 3-plane layer names
    stream[first_mul] |= np.uint64(3) << np.uint64(8)
    bad = LayerProgram(stream, prog.weights, prog.params, prog.outliers, prog.in_features)
    code = validate.stream_code(bad)
    assert code & 0xFF == validate.ERR_LUTACC
    with pytest.raises(validate.StreamError, match=f"at word {code >> 8}"):
        fast.plan(bad)


@pytest.mark.parametrize("tables", ["int8", "fp32"])
def test_lut_cpu_runs_bcq_linear_on_the_engine_and_round_trips(tables, tmp_path):
    from bitsmith.backends import backend_for_target
    from bitsmith.runtime import CompiledModel
    rng = np.random.default_rng(5)
    signs, scales = random_operands(rng, 3, 40, 96, 32, "pow2")
    scales = np.where(scales == ZERO_EXPONENT, scales, np.clip(scales, -8, -2)).astype(np.int8)
    module, _ = bcq_module(signs, scales, "pow2", 32, ("batch", 96), rng.normal(size=40).astype(np.float32))
    backend = backend_for_target("lut-cpu")
    options = {**backend.option_defaults("lut-cpu"), "lut_tables": tables, "lut_host": "reference"}
    cm = CompiledModel(module, backend.build(module, "lut-cpu", options), "lut-cpu", options)
    assert cm.executable.report()["streams"]["instructions"]["BCQACC"] > 0
    x = rng.normal(size=(4, 96)).astype(np.float32)
    want = run_function(module, "main", [x])[0]
    got = cm(x).numpy()
    # the backend's stated tolerance (int8 tables: 3% of max|y|; fp32: float32 summation order)
    assert backend.tolerance("lut-cpu", options).mismatch(got, want) is None
    cm.save(str(tmp_path / "a"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    np.testing.assert_array_equal(loaded(x).numpy(), got)


@pytest.mark.parametrize("scale,offset", [("pow2", False), ("fp16", False), ("pow2", True)])
def test_tiny_llama_shiftadd_on_lut_cpu_equals_the_reference_of_the_same_module(scale, offset):
    # one quantization: lut-cpu's build runs the bcq_linear layers on the engine (fp32 tables:
    # float32 summation order only, the 1e-3 bound of tests/test_lut_smollm2.py) and the
    # reference target interprets the same IR; greedy tokens must agree
    import dataclasses
    from bitsmith.backends import backend_for_target
    from bitsmith.testing.hf_configs import VOCAB, make_model
    lut = bitsmith.compile(make_model("llama"), "lut-cpu", quant="shiftadd-w3", group_size=32, shiftadd_iterations=2,
                           shiftadd_scale=scale, shiftadd_offset=offset, head_quant="fp32", lut_tables="fp32",
                           lut_host="reference")
    assert lut.report()["executable"]["streams"]["instructions"]["BCQACC"] > 0
    rb = backend_for_target("reference")
    ref = dataclasses.replace(lut, executable=rb.build(lut.module, "reference", rb.option_defaults("reference")),
                              target="reference", options=rb.option_defaults("reference"))
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
    a, b = ref(ids).numpy(), lut(ids).numpy()
    assert np.all(np.abs(a - b) <= 1e-3 + 1e-3 * np.abs(a))
    assert np.array_equal(np.asarray(ref.generate(ids[:1, :4], max_new_tokens=8)),
                          np.asarray(lut.generate(ids[:1, :4], max_new_tokens=8)))
