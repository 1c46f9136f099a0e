"""The engine's builds (AVX2, AVX-512): choice from mcpu, refusal on a CPU without the chosen
instruction set, and the grouped-tile kernels against the reference executor."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import bitsmith
from bitsmith.backends import native_loader
from bitsmith.backends.lut import native, reference_executor
from bitsmith.backends.lut.codegen import generate
from bitsmith.backends.lut.decompose import decompose
from bitsmith.runtime.artifact import NativeArtifactError
from bitsmith.testing.hf_configs import make_model

from lut_operands import LUT_SCHEMES, random_qlinear

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
@given(tiled_layers(), st.sampled_from([4, 32, 128]), st.sampled_from([1, 2, 3]))
def test_grouped_tiles_match_the_reference_bit_exactly(engine, layer, table_group, threads):
    # every row's float operations are the single-tile order: exact equality, not a tolerance
    attrs, ops, x = layer
    prog = generate(decompose(attrs, ops), table_group)
    assert np.array_equal(engine.run(prog, x, True, threads), reference_executor.run(prog, x, True))
