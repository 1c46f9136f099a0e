"""Target lut-cpu end to end: tiny HF models against the reference target, artifacts, options."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import native_loader
from bitsmith.backends.lut import host, native, program
from bitsmith.errors import ArtifactError, BitsmithError, UnsupportedOpError

from bitsmith.testing.hf_configs import VOCAB, make_model

IDS = np.random.default_rng(0).integers(0, 128, (2, 7))
DEFAULT_HOST = "tvm-llvm" if host.tvm_available() else "reference-interpreter"
needs_tvm = pytest.mark.skipif(not host.tvm_available(), reason="the tvm-llvm host path needs apache-tvm")


@pytest.fixture(autouse=True)
def _private_kernel_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


def _logits(cm, ids=IDS):
    out = cm(ids)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("arch,quant,extra", [("llama", "bitmod-w4", {"outliers": 0.01}),
                                              ("gpt2", "rtn-int3", {}),
                                              ("qwen2", "bitmod-w3", {})])
def test_fp32_tables_match_the_reference_target(arch, quant, extra):
    model = make_model(arch)
    ref = bitsmith.compile(model, target="reference", quant=quant, group_size=32, **extra)
    lut = bitsmith.compile(model, target="lut-cpu", quant=quant, group_size=32, lut_tables="fp32", **extra)
    a, b = _logits(ref), _logits(lut)
    # fp32 tables are exact up to float32 summation order; 1e-5 is ~100x the float32 rounding seen
    assert np.all(np.abs(a - b) <= 1e-5 + 1e-5 * np.abs(a))
    assert np.array_equal(np.asarray(ref.generate(IDS[:1], max_new_tokens=8)),
                          np.asarray(lut.generate(IDS[:1], max_new_tokens=8)))


def test_int8_tables_are_close_and_report_stream_statistics():
    model = make_model("llama")
    ref = bitsmith.compile(model, target="reference", quant="rtn-int2-sym", group_size=32)
    lut = bitsmith.compile(model, target="lut-cpu", quant="rtn-int2-sym", group_size=32)
    a, b = _logits(ref), _logits(lut)
    # int8 tables (one scale per 32-activation block, entries rounded to 1/254 of the block's
    # largest entry): measured max|a - b| = 1.45% of max|a| on this model and input, the same
    # under AVX2 emulation (OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2: the engine is one
    # portable AVX2 build, and the hosts' float32 summation order moves logits by ~1e-7 of this).
    # 3% is a 2x margin; a wrong plane weight, scale or table index moves logits by O(max|a|).
    assert np.abs(a - b).max() <= 0.03 * np.abs(a).max()
    rep = lut.report()["executable"]
    assert rep["lut_tables"] == "int8" and rep["host"] == DEFAULT_HOST
    stats = rep["streams"]
    assert stats["layers"] == 15   # 7 projections x 2 layers + lm_head (rtn-int8 by default)
    ops = stats["instructions"]
    assert ops["TILE"] == ops["STORE"] and ops["END"] == ops["SYNC"] == 15
    assert stats["weight_bytes"] > 0 and stats["table_bytes_per_token"]["int8"] > 0
    # one lookup per plane per quad: 2 planes = K/2 per output for 448 outputs with K=64 (q, k, v,
    # o, gate, up) and 64 with K=128 (down) per layer; lm_head, 8 planes: 2K = 128 for VOCAB outputs
    want = (2 * (448 * 32 + 64 * 64) + VOCAB * 128) / (2 * 512 + VOCAB)
    assert stats["lookups_per_output"] == pytest.approx(want, abs=0.005)


def test_reference_executor_is_selectable_and_agrees_bit_exactly():
    model = make_model("qwen2")
    kw = dict(quant="bitmod-w4", group_size=16, outliers=0.02)
    slow = bitsmith.compile(model, target="lut-cpu", lut_executor="reference", **kw)
    assert slow.report()["executable"]["executor"].startswith("reference")
    if not native.cpu_has_avx2():
        pytest.skip("no AVX2 for the fast executor")
    fast = bitsmith.compile(model, target="lut-cpu", lut_executor="fast", **kw)
    assert fast.report()["executable"]["executor"].startswith("native")
    assert np.array_equal(_logits(slow), _logits(fast))


def test_artifact_round_trip_and_stored_program(tmp_path, capsys):
    model = make_model("llama")
    cm = bitsmith.compile(model, target="lut-cpu", quant="bitmod-w3", group_size=32)
    cm.save(str(tmp_path / "a"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert np.array_equal(_logits(cm), _logits(loaded))
    target_dir = tmp_path / "a" / "target" / "lut"
    doc = json.loads((target_dir / "program.json").read_text())
    assert doc["host"] == DEFAULT_HOST and len(doc["layers"]) == 15  # + lm_head (rtn-int8 by default)
    assert (target_dir / "lutexec.so").read_bytes()[:4] == b"\x7fELF"
    assert loaded.report()["executable"]["streams"] == cm.report()["executable"]["streams"]
    # every shared library is declared native: the engine (the default mcpu "host": this CPU's build) and the host kernels
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    libraries = sorted(n for n in manifest["files"] if n.endswith(".so"))
    assert sorted(manifest["native"]) == libraries
    engine = manifest["native"]["target/lut/lutexec.so"]
    assert engine["kind"] == "lut-engine" and engine["cpu"] == native.ENGINE_ISAS[native.choose_isa("host")].spec.cpu
    assert {"avx2", "fma"} <= set(engine["features"]) <= native_loader.cpu_features()
    assert all(manifest["native"][n]["kind"] == ("tvm-step-driver" if n.endswith("driver/stepdrv.so")
                                                 else "tvm-llvm-kernel") for n in libraries if "/host/" in n)
    from bitsmith.cli import main
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "instructions" in text and "LUTACC" in text and "lookups_per_output" in text


def test_missing_program_file_is_a_clear_artifact_error():
    with pytest.raises(ArtifactError, match="program.json"):
        program.from_files({})


def test_refusals_name_the_problem():
    model = make_model("llama")
    with pytest.raises(UnsupportedOpError, match=r"target lut-cpu\): N:M sparsity \(2:4\) has no LUT lowering"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, sparsity="2:4")
    with pytest.raises(UnsupportedOpError, match="group_size 6"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=6)
    with pytest.raises(BitsmithError, match="lut_tables"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", lut_tables="int4")


@pytest.mark.parametrize("lut_host", ["reference", pytest.param("tvm-llvm", marks=needs_tvm)])
def test_unquantized_model_runs_entirely_on_the_host_path(lut_host):
    model = make_model("gpt2")
    ref = bitsmith.compile(model, target="reference")
    lut = bitsmith.compile(model, target="lut-cpu", lut_host=lut_host)
    a, b = _logits(ref), _logits(lut)
    if lut_host == "reference":
        assert np.array_equal(a, b)
    else:  # tvm-llvm fp32 kernels: float32 summation order only (see test_tvm_llvm.py)
        assert np.abs(a - b).max() <= 1e-4
    assert lut.report()["executable"]["streams"]["layers"] == 0


@needs_tvm
@pytest.mark.parametrize("arch,quant", [("llama", "bitmod-w4"), ("gpt2", "rtn-int4")])
def test_tvm_host_and_reference_host_agree(arch, quant):
    """Same engine, same streams: the hosts differ only in float32 summation order of the
    non-quantized ops (TVM kernels vs numpy), so logits agree to ~1e-5 of their scale."""
    model = make_model(arch)
    kw = dict(quant=quant, group_size=32, lut_tables="fp32")
    ref_host = bitsmith.compile(model, target="lut-cpu", lut_host="reference", **kw)
    tvm_host = bitsmith.compile(model, target="lut-cpu", lut_host="tvm-llvm", **kw)
    rep = tvm_host.report()["executable"]
    assert rep["host"] == "tvm-llvm" and rep["host_engine_calls"] == rep["streams"]["layers"] > 0 and rep["host_kernels"] > 0
    assert ref_host.report()["executable"]["host"] == "reference-interpreter"
    a, b = _logits(ref_host), _logits(tvm_host)
    assert np.all(np.abs(a - b) <= 1e-5 + 1e-5 * np.abs(a))
    assert np.array_equal(np.asarray(ref_host.generate(IDS[:1], max_new_tokens=8)),
                          np.asarray(tvm_host.generate(IDS[:1], max_new_tokens=8)))


@needs_tvm
def test_tvm_host_artifact_loads_without_compiling(tmp_path, monkeypatch):
    import tvm
    model = make_model("qwen2")
    cm = bitsmith.compile(model, target="lut-cpu", quant="bitmod-w3", group_size=32)
    cm.save(str(tmp_path / "a"))
    assert (tmp_path / "a" / "target" / "host" / "plan.json").is_file()

    def no_compile(*a, **k):
        raise AssertionError("loading a lut-cpu artifact must not compile")

    monkeypatch.setattr(tvm, "compile", no_compile)
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert loaded.report()["executable"]["host"] == "tvm-llvm"
    assert np.array_equal(_logits(cm), _logits(loaded))


@needs_tvm
def test_artifact_for_tvm_host_falls_back_to_the_interpreter_without_tvm(tmp_path, monkeypatch):
    model = make_model("llama")
    cm = bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, lut_tables="fp32")
    cm.save(str(tmp_path / "a"))
    monkeypatch.setattr(host, "tvm_available", lambda: False)
    loaded = bitsmith.load(str(tmp_path / "a"))
    rep = loaded.report()["executable"]
    assert rep["host"] == "reference-interpreter" and "TVM is not installed" in rep["host_note"]
    a, b = _logits(cm), _logits(loaded)
    assert np.all(np.abs(a - b) <= 1e-5 + 1e-5 * np.abs(a))
    with pytest.raises(BitsmithError, match="needs apache-tvm"):
        host.load_host("tvm-llvm", "tvm-llvm", None, {}, None, {}, {})
    with pytest.raises(BitsmithError, match="lut_host='tvm-llvm' needs apache-tvm"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, lut_host="tvm-llvm")


@needs_tvm
def test_auto_host_falls_back_to_the_interpreter_when_tvm_cannot_lower(monkeypatch):
    def refuse(*a, **k):
        raise UnsupportedOpError("rope_custom", module_path="model.layers.0", target="tvm-llvm")

    monkeypatch.setattr(host.TVMHost, "build", classmethod(lambda cls, *a, **k: refuse()))
    model = make_model("llama")
    cm = bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32)
    rep = cm.report()["executable"]
    assert rep["host"] == "reference-interpreter" and "rope_custom" in rep["host_note"]
    with pytest.raises(UnsupportedOpError, match="rope_custom"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, lut_host="tvm-llvm")


@needs_tvm
def test_tvm_host_requested_for_a_reference_host_artifact_is_refused():
    """lut_host='tvm-llvm' never gives the reference interpreter: loading target files built with
    the reference host under that option raises, as the build does when tvm-llvm cannot lower."""
    from bitsmith.backends.lut import LUTBackend
    cm = bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32,
                          lut_host="reference")
    files = cm.executable.files()
    backend = LUTBackend()
    same = backend.load(cm.module, "lut-cpu", cm.options, files)
    assert same.report()["host"] == "reference-interpreter" and "host_note" not in same.report()
    with pytest.raises(ArtifactError, match=r"program\.json: records host 'reference-interpreter'.*"
                                            r"lut_host='tvm-llvm'"):
        backend.load(cm.module, "lut-cpu", {**cm.options, "lut_host": "tvm-llvm"}, files)


def test_bad_host_choice_is_refused():
    with pytest.raises(BitsmithError, match="lut_host must be one of"):
        bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32, lut_host="gpu")
