"""The engine's builds (AVX2, AVX-512): choice from mcpu, refusal on a CPU without the chosen
instruction set, and the grouped-tile kernels against the reference executor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bitsmith
from bitsmith.backends import native_loader
from bitsmith.backends.lut import isa, native, reference_executor
from bitsmith.backends.lut.codegen import LayerProgram, generate
from bitsmith.backends.lut.decompose import decompose
from bitsmith.ir.quantized import dequantize
from bitsmith.runtime.artifact import NativeArtifactError
from bitsmith.testing.hf_configs import make_model

from lut_operands import LUT_SCHEMES, random_qlinear

EPS32 = float(np.finfo(np.float32).eps)
AVX2_ONLY = frozenset(native.ENGINE_ISAS["avx2"].spec.features) | {"sse", "sse2"}  # a Zen 3 as the engine sees it


@pytest.fixture(scope="module", params=sorted(native.ENGINE_ISAS))
def engine(request):
    if not native.cpu_runs(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return native.load_library(native.build_library(isa=request.param), request.param)


@pytest.mark.parametrize("mcpu,isa", [("x86-64-v3", "avx2"), ("haswell", "avx2"), ("znver3", "avx2"),
                                      ("x86-64-v4", "avx512"), ("skylake-avx512", "avx512")])
def test_build_follows_the_target_mcpu(mcpu, isa):
    assert native.choose_isa(mcpu) == isa


def test_host_mcpu_follows_this_cpu(monkeypatch):
    monkeypatch.setattr(native_loader, "cpu_features", lambda: AVX2_ONLY)
    assert native.choose_isa("host") == "avx2"
    monkeypatch.setattr(native_loader, "cpu_features", lambda: AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"})
    assert native.choose_isa("host") == "avx512"


def test_default_mcpu_is_the_build_machine(monkeypatch):
    """As tvm-llvm's: the default builds for this CPU, so an AVX2-only one (CI's Zen 3) gets the
    AVX2 build, an AVX-512 one the AVX-512 build (tests/test_lut_backend.py checks the manifest)."""
    from bitsmith.backends.lut import LUTBackend
    assert LUTBackend().option_defaults("lut-cpu")["mcpu"] == "host"
    monkeypatch.setattr(native_loader, "cpu_features", lambda: AVX2_ONLY)
    cm = bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32, lut_host="reference")
    assert cm.report()["executable"]["lut_isa"] == "avx2"


def test_a_bad_mcpu_is_refused():
    with pytest.raises(native.NativeBuildError, match="mcpu"):
        native.choose_isa("-fplugin=x")
    with pytest.raises(native.NativeBuildError, match="knows mcpu 'no-such-cpu'"):
        native.choose_isa("no-such-cpu")


def test_each_build_reports_its_instruction_set(engine):
    assert int(engine._lib.lut_isa()) == engine.isa.code


def test_a_library_recorded_as_another_build_is_refused():
    if not native.cpu_has_avx2():
        pytest.skip("no AVX2")
    with pytest.raises(native.NativeBuildError, match="lut_isa"):
        native.NativeExecutor(native.build_library(isa="avx2"), "avx512")


def test_avx512_build_is_refused_on_a_cpu_without_it(monkeypatch):
    lib = native.build_library(isa="avx512")  # compiling needs no AVX-512, only gcc
    monkeypatch.setattr(native_loader, "cpu_features", lambda: AVX2_ONLY)
    with pytest.raises(native_loader.UnsupportedCPUError, match="avx512bw.*mcpu='x86-64-v3'"):
        native.load_library(lib, "avx512")
    assert native.load_library(native.build_library(isa="avx2"), "avx2") is not None


def test_artifact_records_its_build_and_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    cm = bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32,
                          mcpu="x86-64-v4", lut_host="reference")
    assert cm.report()["executable"]["lut_isa"] == "avx512"
    cm.save(str(tmp_path / "a"))
    doc = json.loads((tmp_path / "a" / "target" / "lut" / "program.json").read_text())
    assert doc["isa"] == "avx512" and "-mavx512bw" in doc["cflags"]
    spec = json.loads((tmp_path / "a" / "manifest.json").read_text())["native"]["target/lut/lutexec.so"]
    assert {"avx512f", "avx512bw", "avx512vl"} <= set(spec["features"])
    monkeypatch.setattr(native_loader, "cpu_features", lambda: AVX2_ONLY)
    with pytest.raises(NativeArtifactError, match="compiled for avx512.*lacks avx512bw"):
        bitsmith.load(str(tmp_path / "a"))


def _logits(cm, ids):
    out = cm(ids)
    return np.asarray(out[0] if isinstance(out, (list, tuple)) else out, np.float64)


@st.composite
def tiled_layers(draw):
    """Layers of many tiles (groups of 1-4 same-shape tiles, with outliers in some tiles only,
    so neighbouring tiles differ in shape) and short last tiles."""
    scheme = draw(st.sampled_from(LUT_SCHEMES))
    n = draw(st.integers(1, 9 * 16 + 5))
    k = draw(st.integers(1, 160))
    gs = 4 * draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    attrs, ops = random_qlinear(rng, scheme, n, k, gs, draw(st.booleans()))
    x = rng.normal(0, 1, (draw(st.integers(1, 5)), k)).astype(np.float32)
    return attrs, ops, x


@settings(max_examples=25, deadline=None)
@given(tiled_layers(), st.sampled_from([4, 32, 128]), st.sampled_from([1, 2, 3]), st.sampled_from([32, 8]))
def test_grouped_tiles_match_the_reference_bit_exactly(engine, layer, table_group, threads, activation_bits):
    # every row's float operations are the single-tile order and table sums are exact integers
    # (int8 activations included): exact equality, not a tolerance
    attrs, ops, x = layer
    prog = generate(decompose(attrs, ops), table_group)
    got = engine.run(prog, x, True, threads, activation_bits=activation_bits)
    assert np.array_equal(got, reference_executor.run(prog, x, True, activation_bits))


@st.composite
def long_run_layers(draw):
    """Layers whose groups hold long runs of LUTACCs (the engine keeps ACC in registers across a
    run): groups of up to 256 inputs cut into table blocks of 4-256 activations, so a run has 1-64
    instructions of 1-64 (quad) or 1-32 (pair) words, quad and pair units mixed (bitmod-w4: 5 planes)."""
    scheme = draw(st.sampled_from(LUT_SCHEMES))
    gs = 4 * draw(st.integers(1, 64))
    k = draw(st.integers(1, 2 * gs + 3))
    n = draw(st.integers(1, 6 * 16 + 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    attrs, ops = random_qlinear(rng, scheme, n, k, gs, draw(st.booleans()))
    x = rng.normal(0, 1, (draw(st.integers(1, 4)), k)).astype(np.float32)
    return attrs, ops, x, draw(st.sampled_from([4, 8, 32, 256]))


@settings(max_examples=30, deadline=None)
@given(long_run_layers(), st.sampled_from([1, 2]), st.sampled_from([32, 8]))
def test_lutacc_runs_match_the_reference_bit_exactly(engine, layer, threads, activation_bits):
    # a run reorders no float operation of a row (ACC is permuted, not recombined): exact equality
    attrs, ops, x, table_group = layer
    prog = generate(decompose(attrs, ops), table_group)
    got = engine.run(prog, x, True, threads, activation_bits=activation_bits)
    assert np.array_equal(got, reference_executor.run(prog, x, True, activation_bits))


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["rtn-int2", "rtn-int4", "bitmod-w4"]), st.integers(1, 3))
def test_a_lutacc_run_after_another_instruction_continues_acc(engine, seed, scheme, m):
    """Code generation starts every run of LUTACCs with ACC = 0 (after TILE or SCALE); a stream may
    also put an OUTLIER between two LUTACCs of a group, so the second run starts from the first's
    ACC (the engine loads it into registers, permuted to the lanes' order). Each tile's OUTLIER is
    moved right after its first LUTACC; tiles with and without one also differ in shape."""
    rng = np.random.default_rng(seed)
    attrs, ops = random_qlinear(rng, scheme, 5 * 16 + 3, 72, 32, outliers=True)
    prog = generate(decompose(attrs, ops), 8)
    words = [int(w) for w in prog.stream]
    op = [w & 0xFF for w in words]
    tiles = [i for i, o in enumerate(op) if o == isa.FORMATS["TILE"].opcode] + [len(words)]
    out = words[:tiles[0]]
    for a, b in zip(tiles, tiles[1:]):
        tile = words[a:b]
        kinds = [w & 0xFF for w in tile]
        if isa.FORMATS["OUTLIER"].opcode in kinds:
            o = kinds.index(isa.FORMATS["OUTLIER"].opcode)
            moved = tile.pop(o)
            tile.insert(kinds.index(isa.FORMATS["LUTACC"].opcode) + 1, moved)
        out += tile
    moved_prog = LayerProgram(np.array(out, np.uint64), prog.weights, prog.params, prog.outliers, prog.in_features)
    x = rng.normal(0, 1, (m, 72)).astype(np.float32)
    for bits in (32, 8):
        want = reference_executor.run(moved_prog, x, True, bits)
        assert np.array_equal(engine.run(moved_prog, x, True, 1, activation_bits=bits), want)


SHAPE_FAST = 1 << 8  # lutexec.c: the tile has only LUTACC and SCALE before its STORE


def test_plan_records_same_shape_tile_groups(engine):
    """lut_plan writes, after the TABLE and TILE positions, per tile a shape word: how many
    same-shape tiles start at it (at most 4, bits 0-7; exec groups tiles by it), SHAPE_FAST, and
    from bit 16 the SCALE.pidx step between the group's tiles (code generation: groups per tile).
    Outliers in one tile change its shape and take it off the fast path."""
    rng = np.random.default_rng(5)
    attrs, ops = random_qlinear(rng, "rtn-int4", 7 * 16, 64, 32)
    bound = engine.plan(generate(decompose(attrs, ops)))
    shape = bound.pos[bound.ntables + bound.nsegs:][:bound.nsegs]
    same = shape & 0xFF
    assert same.tolist() == [4, 4, 4, 4, 3, 2, 1]
    assert all(shape & SHAPE_FAST)
    assert (shape >> 16).tolist() == [2, 2, 2, 2, 2, 2, 0]  # 64 inputs in groups of 32; one tile: no step
    attrs, ops = random_qlinear(rng, "rtn-int4", 6 * 16, 64, 32, outliers=True)
    ptr = np.zeros(6 * 16 + 1, np.int32)
    ptr[16 * 2 + 1:] = 1  # one outlier, in row 32: tile 2 alone has an OUTLIER instruction
    ops[-3:] = [np.ones(1, np.float16), np.array([3], np.int32), ptr]
    prog = generate(decompose(attrs, ops))
    bound = engine.plan(prog)
    shape = bound.pos[bound.ntables + bound.nsegs:][:bound.nsegs]
    assert (shape & 0xFF).tolist() == [2, 1, 1, 3, 2, 1]
    assert [bool(v & SHAPE_FAST) for v in shape] == [True, True, False, True, True, True]
    x = rng.normal(0, 1, (2, 64)).astype(np.float32)
    assert np.array_equal(engine.run(prog, x, True, 1), reference_executor.run(prog, x, True))


def _q8_blocks(x: np.ndarray, group_size: int, table_group: int) -> np.ndarray:
    """x with each table block (table_group activations inside a weight group) replaced by its
    int8 quantization q * d, d = max|x| / 127 (llama.cpp's Q8_0 rule; ties to even here): the
    activations a W4A8 integer dot product multiplies, written independently of the engine."""
    out = np.zeros(x.shape, np.float64)
    k = x.shape[1]
    for g0 in range(0, k, group_size):
        for b0 in range(g0, min(g0 + group_size, k), table_group):
            blk = x[:, b0:min(b0 + table_group, g0 + group_size, k)]
            mx = np.abs(blk).max(axis=1, keepdims=True)
            inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, 1), 0).astype(np.float32)
            out[:, b0:b0 + blk.shape[1]] = np.rint(blk * inv) * (mx / np.float32(127)).astype(np.float32)
    return out


@settings(max_examples=40, deadline=None)
@given(tiled_layers(), st.sampled_from([4, 32, 128]))
def test_int8_activations_compute_the_integer_dot_product(layer, table_group):
    """activation_bits=8 equals (Q8-quantized x) @ W^T, outliers times the float x, up to float32
    rounding of the per-block scalings: (K/4 + 8) eps32 of the summed magnitudes, as for fp32
    tables (the integer part is exact)."""
    attrs, ops, x = layer
    w = decompose(attrs, ops)
    prog = generate(w, table_group)
    y = reference_executor.run(prog, x, True, 8)
    dense = dequantize(attrs, ops).astype(np.float64)
    sparse = np.zeros_like(dense)
    sparse[w.outlier_rows, w.outlier_cols] = dense[w.outlier_rows, w.outlier_cols]
    xq = _q8_blocks(x, w.group_size, min(table_group, w.group_size))
    want = xq @ (dense - sparse).T + x.astype(np.float64) @ sparse.T
    gi = np.arange(w.u.shape[1]) // w.group_size
    mag = np.abs(w.scales[:, gi]) * (w.u + w.offsets[:, gi]).astype(np.float64)
    bound = (x.shape[1] / 4 + 8) * EPS32 * (np.abs(xq) @ mag.T + np.abs(x) @ np.abs(sparse).T) + 1e-30
    assert np.all(np.abs(y - want) <= bound)


def test_int8_activations_of_a_block_with_inf_or_nan_give_nan_on_both_executors(engine):
    """A block holding inf or NaN has no int8 scale: both executors give NaN outputs for its row
    (before: rint(inf * 0) cast to int, INT_MIN in C and signed overflow) and leave other rows."""
    attrs, ops = random_qlinear(np.random.default_rng(2), "rtn-int4", 20, 64, 32)
    prog = generate(decompose(attrs, ops))
    x = np.random.default_rng(3).normal(0, 1, (4, 64)).astype(np.float32)
    x[1, 5], x[2, 40], x[3, 0] = np.inf, -np.inf, np.nan
    got = engine.run(prog, x, True, 1, activation_bits=8)
    want = reference_executor.run(prog, x, True, 8)
    np.testing.assert_array_equal(got, want)  # NaN where NaN, the rest bit for bit
    assert np.isnan(got[1:]).all() and np.isfinite(got[0]).all()
    assert np.array_equal(got[0], reference_executor.run(prog, x[:1], True, 8)[0])


def test_int8_activations_need_integer_tables(engine):
    attrs, ops = random_qlinear(np.random.default_rng(1), "rtn-int4", 16, 32, 32)
    prog = generate(decompose(attrs, ops))
    x = np.ones((1, 32), np.float32)
    with pytest.raises(ValueError, match="activation_bits=8 runs on integer tables"):
        engine.run(prog, x, False, activation_bits=8)
    with pytest.raises(ValueError, match="activation_bits must be 8 or 32"):
        engine.run(prog, x, True, activation_bits=4)
    with pytest.raises(ValueError, match="activation_bits must be 8 or 32"):
        reference_executor.run(prog, x, True, 16)


def test_activation_bits_option_runs_the_model_and_is_refused_where_it_does_not_apply():
    from bitsmith.errors import BitsmithError
    model = make_model("llama")
    ids = np.random.default_rng(0).integers(0, 128, (2, 7))
    ref = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32)
    a8 = bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, activation_bits=8,
                          lut_host="reference")
    assert a8.report()["executable"]["activation_bits"] == 8
    want, got = (_logits(c, ids) for c in (ref, a8))
    # int8 activations (one scale per 32-activation block, like llama.cpp's Q8_0): measured
    # max|got - want| = 0.37% of max|want| on this model and input (int8 tables: 1.45%,
    # tests/test_lut_backend.py); the backend's 3% bound holds with an 8x margin, and a wrong
    # plane weight, scale or table index moves logits by O(max|want|).
    assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
    # the default (tvm-llvm) host runs the layers through the native step driver: it must run
    # them with A8 tables too. Against the reference host's A8 logits, measured max diff 2.3e-7
    # of max|want| (only the non-LUT ops' float rounding differs); int8 tables there measured
    # 1.2% (and must be >= 1.45% - 0.37% by the triangle inequality over the two errors above).
    # One activation rounded the other way moves logits by ~one int8 step of one block, far
    # below the 0.37% that all blocks' half steps add up to: 0.3% separates the two kinds.
    default_host = bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, activation_bits=8)
    assert "stepdrv" in default_host.report()["executable"]["host_executor"]
    assert np.abs(_logits(default_host, ids) - got).max() <= 0.003 * np.abs(want).max()
    with pytest.raises(BitsmithError, match="activation_bits"):  # groups of 32 at 4 bits: no int8 kernel
        bitsmith.compile(model, target="tvm-llvm", quant="rtn-int4", group_size=32, head_quant="fp32",
                         activation_bits=8)
    from bitsmith.backends.lut import LUTBackend, LUTOptionError, _check_options
    defaults = LUTBackend().option_defaults("lut-cpu")
    with pytest.raises(LUTOptionError, match="needs lut_tables='int8'"):
        _check_options({**defaults, "activation_bits": 8, "lut_tables": "fp32"})
    for bad in (4, True, "8"):
        with pytest.raises(LUTOptionError, match="activation_bits must be one of"):
            _check_options({**defaults, "activation_bits": bad})


def _rearranged(prog: LayerProgram, rng: np.random.Generator) -> LayerProgram:
    """The same layer with its tiles in a random stream order, each tile's weight words at a random
    place and the parameter blocks shuffled (SCALE.pidx rewritten): the engine must not assume
    codegen's layout (tiles' words one after the other, pidx = tile * groups + group), which its
    one-row path only uses to prefetch and to skip reading other tiles' SCALE words."""
    words = [int(w) for w in prog.stream]
    op = [w & 0xFF for w in words]
    starts = [i for i, o in enumerate(op) if i >= 4 and o == isa.FORMATS["TILE"].opcode]  # after the header
    end = len(words) - 1  # the END word
    tiles = [words[a:b] for a, b in zip(starts, starts[1:] + [end])]
    nblocks = prog.params.size // 32
    perm = rng.permutation(nblocks)
    params = np.zeros_like(prog.params).reshape(nblocks, 32)
    params[perm] = prog.params.reshape(nblocks, 32)
    wptr = [t[0] >> 8 for t in tiles]
    sizes = [b - a for a, b in zip(wptr, wptr[1:] + [prog.weights.size // 32])]
    order = rng.permutation(len(tiles))
    weights, new_tiles, at = [], [], 0
    pidx_mask = ((1 << 28) - 1) << 36
    for t in order:
        tile = list(tiles[t])
        weights.append(prog.weights[32 * wptr[t]:32 * (wptr[t] + sizes[t])])
        tile[0] = isa.FORMATS["TILE"].opcode | (at << 8)
        at += sizes[t]
        for i, w in enumerate(tile):
            if w & 0xFF == isa.FORMATS["SCALE"].opcode:
                tile[i] = (w & ~pidx_mask) | (int(perm[(w >> 36) & ((1 << 28) - 1)]) << 36)
        new_tiles.append(tile)
    stream = words[:starts[0]] + [w for t in new_tiles for w in t] + words[end:]
    return LayerProgram(np.array(stream, np.uint64), np.concatenate(weights), params.reshape(-1), prog.outliers,
                        prog.in_features)


@settings(max_examples=25, deadline=None)
@given(tiled_layers(), st.sampled_from([4, 32, 128]), st.sampled_from([1, 2]), st.booleans(),
       st.sampled_from([32, 8]))
def test_one_row_path_matches_the_reference_bit_exactly(engine, layer, table_group, threads, rearrange,
                                                         activation_bits):
    """M = 1 with int8 tables (of float or int8 activations) runs tiles without OUTLIERs on the
    one-row path (run_tiles_fast: ACC and YT in registers, in the lanes' order); the same layer
    rearranged in memory (_rearranged) too. Exact equality with the reference executor, as the
    general path's."""
    attrs, ops, x = layer
    prog = generate(decompose(attrs, ops), table_group)
    if rearrange:
        prog = _rearranged(prog, np.random.default_rng(int(abs(x[0, 0]) * 1e6)))
    for row in x[:2]:
        xr = row[None, :]
        got = engine.run(prog, xr, True, threads, activation_bits=activation_bits)
        assert np.array_equal(got, reference_executor.run(prog, xr, True, activation_bits))
