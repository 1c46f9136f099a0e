"""Target lut-cpu end to end: tiny HF models against the reference target, artifacts, options."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitsmith
from bitsmith.backends.lut import native, program
from bitsmith.errors import ArtifactError, BitsmithError, UnsupportedOpError

from hf_configs import make_model

IDS = np.random.default_rng(0).integers(0, 128, (2, 7))


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
    # int8 tables: ~1% relative error per layer (table quantization), tiny model logits are O(1)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    rep = lut.report()["executable"]
    assert rep["lut_tables"] == "int8" and rep["host"] == "reference-interpreter"
    stats = rep["streams"]
    assert stats["layers"] == 14   # 7 projections x 2 layers; lm_head (dense) runs on the host
    ops = stats["instructions"]
    assert ops["TILE"] == ops["STORE"] and ops["END"] == ops["SYNC"] == 14
    assert stats["weight_bytes"] > 0 and stats["table_bytes_per_token"]["int8"] > 0
    # 2 planes: one lookup per plane per quad = K/2 per output; 448 outputs with K=64 (q, k, v,
    # o, gate, up) and 64 with K=128 (down): (448*32 + 64*64) / 512
    assert stats["lookups_per_output"] == 36.0


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
    assert doc["host"] == "reference-interpreter" and len(doc["layers"]) == 14
    assert (target_dir / "lutexec.so").read_bytes()[:4] == b"\x7fELF"
    assert loaded.report()["executable"]["streams"] == cm.report()["executable"]["streams"]
    from bitsmith.cli import main
    assert main(["inspect", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "instructions" in text and "LUTACC" in text and "lookups_per_output" in text


def test_missing_program_file_is_a_clear_artifact_error():
    with pytest.raises(ArtifactError, match="program.json"):
        program.from_files({})


def test_refusals_name_the_problem():
    model = make_model("llama")
    with pytest.raises(UnsupportedOpError, match="N:M sparsity.*lut|lut-cpu"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=32, sparsity="2:4")
    with pytest.raises(UnsupportedOpError, match="group_size 6"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", group_size=6)
    with pytest.raises(BitsmithError, match="lut_tables"):
        bitsmith.compile(model, target="lut-cpu", quant="rtn-int4", lut_tables="int4")


def test_unquantized_model_runs_entirely_on_the_host_path():
    model = make_model("gpt2")
    ref = bitsmith.compile(model, target="reference")
    lut = bitsmith.compile(model, target="lut-cpu")
    assert np.array_equal(_logits(ref), _logits(lut))
    assert lut.report()["executable"]["streams"]["layers"] == 0
