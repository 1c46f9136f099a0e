"""``bitsmith eval``, the compile quantization flags and ``bitsmith inspect --plot``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import bitsmith  # noqa: E402
from bitsmith.ir.quant_grids import fitted_schemes, get_scheme  # noqa: E402
from bitsmith.ir.quantized import operand_types  # noqa: E402
from bitsmith.runtime.datatype_usage import layer_datatypes  # noqa: E402
from test_cli import assert_one_line_error, run_cli  # noqa: E402

CTX = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny_llama import save_tiny_llama
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from tiny_llama import random_text
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(random_text(CTX * 3 + 5)[0])
    return path


@pytest.fixture(scope="module")
def bitmod_artifact(tiny_dir: Path, tmp_path_factory) -> Path:
    """The tiny model compiled through the CLI with bitmod-w4, groups of 32; the head stays fp32
    so every quantized layer is a bitmod-w4 one (the int8 head default: tests/test_head_quant.py)."""
    out = tmp_path_factory.mktemp("art") / "bitmod"
    from bitsmith.cli import main
    assert main(["compile", str(tiny_dir), "--target", "reference", "--out", str(out),
                 "--quant", "bitmod-w4", "--group-size", "32", "--head-quant", "fp32"]) == 0
    return out


def ppl_from_logits(cm, ids: np.ndarray, ctx: int, windows: int) -> float:
    """ppl from cm(input_ids) logits, window by window, log-softmax written out here."""
    total = 0.0
    for w in range(windows):
        window = ids[w * ctx:(w + 1) * ctx]
        logits = np.asarray(cm(window[None]), dtype=np.float64)[0, :-1]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((log_z - logits[np.arange(ctx - 1), window[1:]]).sum())
    return math.exp(total / (windows * (ctx - 1)))


def test_eval_artifact_equals_ppl_of_its_own_logits(capsys, tmp_path, bitmod_artifact, text_file):
    """The must-show: eval scores the compiled model, computed from its packed codes."""
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", str(bitmod_artifact), "--text", str(text_file),
                                "--ctx", str(CTX), "--windows", "2", "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    cm = bitsmith.load(str(bitmod_artifact))
    ids = np.asarray(cm.tokenizer().encode(text_file.read_text(), add_special_tokens=False).ids)
    assert record["ppl"] == pytest.approx(ppl_from_logits(cm, ids, CTX, 2), rel=1e-12)
    assert record["quant"] == "bitmod-w4" and record["group_size"] == 32
    assert record["windows"] == 2 and record["ctx"] == CTX and record["tokens_scored"] == 2 * (CTX - 1)
    assert 4.0 < record["bits_per_weight"] < 5.0
    assert record["quantize_seconds"] is None  # an artifact holds no timings (deterministic bytes)
    assert f"ppl {record['ppl']:.4f}" in stdout and len(stdout.splitlines()) == 1
    assert "perplexity [" in err and "2/2" in err  # the progress bar


def test_eval_compiles_a_model_dir_with_the_quant_flags(capsys, tmp_path, tiny_dir, text_file, bitmod_artifact):
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--quant", "bitmod-w4", "--group-size", "32", "--head-quant", "fp32",
                           "--text", str(text_file), "--ctx", str(CTX), "--windows", "5", "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    required = {"model", "quant", "group_size", "ppl", "bits_per_weight", "model_bytes", "windows", "ctx",
                "tokens_scored", "seconds", "quantize_seconds"}
    assert required <= set(record)
    assert record["model"] == str(tiny_dir) and record["windows"] == 3  # the text holds 3 windows
    assert "only 3 windows" in err and "compiled in" in err
    report = bitsmith.load(str(bitmod_artifact)).report()
    assert record["model_bytes"] == report["model_bytes"]
    assert record["bits_per_weight"] == pytest.approx(report["bits_per_weight"])
    assert record["quantize_seconds"] > 0
    # the same quantization as the saved artifact: the same perplexity
    code, _, _ = run_cli(capsys, "eval", str(bitmod_artifact), "--text", str(text_file), "--ctx", str(CTX),
                         "--windows", "3", "--json", str(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text())["ppl"] == pytest.approx(record["ppl"], rel=1e-12)


def test_eval_fp32_reports_32_bits(capsys, tmp_path, tiny_dir, text_file):
    out = tmp_path / "r.json"
    code, _, err = run_cli(capsys, "eval", str(tiny_dir), "--quant", "fp32", "--text", str(text_file),
                           "--ctx", str(CTX), "--windows", "1", "--json", str(out))
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["quant"] == "fp32" and record["group_size"] is None and record["bits_per_weight"] == 32.0


def test_unknown_scheme_is_one_line_listing_the_valid_ones(capsys, tiny_dir, text_file):
    for command in (["eval", str(tiny_dir), "--text", str(text_file)], ["compile", str(tiny_dir), "--target",
                                                                          "reference", "--out", "x"]):
        code, _, err = run_cli(capsys, *command, "--quant", "int5")
        assert_one_line_error(code, err, "unknown quantization scheme 'int5'")
        assert all(name in err for name in fitted_schemes()) and "fp32" in err and "gguf" in err


@pytest.mark.parametrize("argv, words", [
    (["--ctx", "200"], "fewer than one window of ctx=200"),
    (["--ctx", "1000"], "exceeds the model's 256 positions"),
    (["--quant", "bitmod-w3"], "quantization options apply only when compiling"),
    (["--target", "elsewhere"], "was compiled for target 'reference'"),
    (["--quant", "fp3", "--calibrate"], "needs calib_text"),
])
def test_eval_errors(capsys, bitmod_artifact, text_file, argv, words):
    code, _, err = run_cli(capsys, "eval", str(bitmod_artifact), "--text", str(text_file), *argv)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bitsmith: error: ") and words in err, err


def test_inspect_plot_writes_a_png(capsys, tmp_path, bitmod_artifact):
    pytest.importorskip("matplotlib")
    png = tmp_path / "types.png"
    code, _, err = run_cli(capsys, "inspect", str(bitmod_artifact), "--plot", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "14 quantized layers" in err


def test_datatype_shares_match_the_selectors_of_the_loaded_model(bitmod_artifact):
    """Decoded from the file alone, the counts equal the selectors the runtime module holds."""
    from bitsmith.ir.code_packing import unpack_codes
    layers = layer_datatypes(bitmod_artifact)
    module = bitsmith.load(str(bitmod_artifact)).module
    scheme = get_scheme("bitmod-w4")
    names = [g.name for g in scheme.candidates]
    fn = module.function("main")
    constants = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
    want = []
    for node in (n for n in fn.nodes if n.op == "qlinear"):
        roles = [r for r, _ in operand_types(node.attr_dict)]
        packed = module.tensors[constants[node.inputs[1 + roles.index("selectors")]]]
        groups = node.attr("in_features") // 32
        want.append(np.bincount(unpack_codes(packed, 2, groups).ravel(), minlength=4).tolist())
    assert [list(layer.groups) for layer in layers] == [names] * len(want)
    assert [list(layer.groups.values()) for layer in layers] == want
    assert all(layer.layer.startswith("model.layers.") for layer in layers), [x.layer for x in layers]
    assert all(sum(layer.shares.values()) == pytest.approx(1.0) for layer in layers)


def test_single_grid_scheme_is_all_one_grid(tmp_path):
    """Built from the quantize pass directly (no capture): rtn-int4 has one grid, no selectors."""
    from artifact_helpers import compiled
    from bitsmith.passes import get_pass
    from quant_modules import DOWN, UP, mlp_module
    module = get_pass("quantize", scheme="rtn-int4", group_size=4).apply(mlp_module())
    compiled(module).save(tmp_path / "art")
    layers = layer_datatypes(tmp_path / "art")
    assert [(x.layer, x.scheme, x.shares) for x in layers] == [(UP, "rtn-int4", {"uint4": 1.0}),
                                                               (DOWN, "rtn-int4", {"uint4": 1.0})]
    assert [x.groups["uint4"] for x in layers] == [16 * 8, 32 * 4]  # rows x groups


def test_plot_without_matplotlib_is_one_line(capsys, monkeypatch, bitmod_artifact, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, "inspect", str(bitmod_artifact), "--plot", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "--plot needs matplotlib")
