"""The ``bitsmith`` command line, run in-process through ``main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bitsmith
from artifact_helpers import compiled, language_model
from bitsmith.cli import main
from bitsmith.runtime.manifest import FORMAT_VERSION, WEIGHTS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitsmith: error: "), err
    assert words in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    compiled(options={"group_size": 128}).save(tmp_path / "art")
    return tmp_path / "art"


def test_targets_lists_reference(capsys):
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0
    assert ["reference", "reference"] in [line.split() for line in out.splitlines()]


def test_inspect_text(capsys, artifact_dir: Path):
    code, out, _ = run_cli(capsys, "inspect", str(artifact_dir))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert "reference (backend reference)" in rows["target"]
    assert '"group_size": 128' in rows["options"]
    assert "1 (48 bytes)" in rows["tensors"]
    assert "constant 1, linear 1, silu 1" in rows["ops"]
    assert WEIGHTS in rows


def test_inspect_json(capsys, artifact_dir: Path):
    code, out, _ = run_cli(capsys, "inspect", str(artifact_dir), "--json", "--verify")
    assert code == 0
    summary = json.loads(out)
    assert summary["target"] == "reference" and summary["format_version"] == FORMAT_VERSION
    assert summary["tensors"] == {"count": 1, "bytes": 48}
    assert summary["op_counts"] == {"constant": 1, "linear": 1, "silu": 1}
    assert summary["files"][WEIGHTS]["size"] == (artifact_dir / WEIGHTS).stat().st_size
    assert summary["verified"] is True


def test_inspect_reads_no_weights_unless_asked_to_verify(capsys, artifact_dir: Path):
    size = (artifact_dir / WEIGHTS).stat().st_size
    (artifact_dir / WEIGHTS).write_bytes(b"g" * size)
    assert run_cli(capsys, "inspect", str(artifact_dir))[0] == 0
    code, _, err = run_cli(capsys, "inspect", str(artifact_dir), "--verify")
    assert_one_line_error(code, err, "does not match the manifest")


def test_inspect_missing_directory(capsys, tmp_path: Path):
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "no such artifact directory")
    assert out == ""


def test_run_generates_with_a_language_model_artifact(capsys, tmp_path: Path):
    language_model().save(tmp_path / "lm")
    code, out, err = run_cli(capsys, "run", str(tmp_path / "lm"), "--prompt", "hello", "--max-new-tokens", "5")
    assert code == 0, err
    assert out == "world\n"  # then <eos>: generation stops and the special token is not printed


def test_run_refuses_a_module_that_is_no_language_model(capsys, artifact_dir: Path):
    code, _, err = run_cli(capsys, "run", str(artifact_dir), "--prompt", "hi")
    assert_one_line_error(code, err, "holds no causal language model")


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "inspect")
    assert code == 2 and "usage:" in err
    code, _, err = run_cli(capsys, "compile", "m", "--target", "reference", "--out", "o", "--option", "novalue")
    assert_one_line_error(code, err, "--option 'novalue' is not KEY=VALUE")


def test_compile_with_unknown_target(capsys, tmp_path: Path):
    code, _, err = run_cli(capsys, "compile", "some-model", "--target", "no-such-target",
                           "--out", str(tmp_path / "art"))
    assert code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]  # after the progress lines
    assert last.startswith("bitsmith: error: unknown target 'no-such-target'"), err
    assert "reference" in last  # the error lists the known targets
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tiny_llama import save_tiny_llama
    return save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


def test_compile_inspect_run_end_to_end(capsys, tmp_path: Path, tiny_llama_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "art"
    code, _, err = run_cli(capsys, "compile", str(tiny_llama_dir), "--target", "reference", "--out", str(out))
    assert code == 0, err
    assert err.splitlines()[-1].startswith(f"saved to {out} (")

    code, text, _ = run_cli(capsys, "inspect", str(out), "--json", "--verify")
    summary = json.loads(text)
    assert summary["module_attrs"]["kind"] == "causal_lm"
    lm = summary["language_model"]
    assert lm["eos_token_id"] == 0 and lm["has_tokenizer"] is True

    prompt = "w5 w17 w3"
    code, generated, err = run_cli(capsys, "run", str(out), "--prompt", prompt, "--max-new-tokens", "6")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 3]])
    want = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=0, pad_token_id=0)[0, 3:]
    want_words = [f"w{int(t)}" for t in want if int(t) != 0]
    assert generated.split() == want_words

