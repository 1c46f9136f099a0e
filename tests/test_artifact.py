"""Artifact directories: round trips, and refusal of every corruption docs/artifact-format.md lists."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from artifact_helpers import compiled, edit_manifest, language_model, read_json, small_module
from bitsmith.backends.base import Backend, Executable
from bitsmith.errors import ArtifactError
from bitsmith.ir import Module, run_function
from bitsmith.runtime import artifact
from bitsmith.runtime.artifact import load_artifact, read_manifest, save_artifact
from bitsmith.runtime.manifest import MANIFEST, TOKENIZER, WEIGHTS
from ir_strategies import random_modules

X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    out = tmp_path / "art"
    compiled(options={"group_size": 128, "modes": ("a", "b")}, compile_info={"pipeline": ["dce", "cse"]},
             timings={"seconds": {"build": 0.5}, "pass_seconds": {"dce": 0.1}}).save(out)
    return out


def expect_refusal(path: Path, bad_file: str, words: str) -> ArtifactError:
    with pytest.raises(ArtifactError) as info:
        load_artifact(path)
    assert info.value.path == str(path / bad_file), info.value
    assert words in info.value.problem, info.value
    return info.value


# --- round trips ---------------------------------------------------------------------------

def test_round_trip_is_bitwise_identical(saved: Path):
    original = compiled()
    loaded = load_artifact(saved)
    assert loaded.module == original.module
    assert loaded.target == "reference"
    assert loaded.options == {"group_size": 128, "modes": ["a", "b"]}  # tuples come back as lists
    assert loaded.compile_info == {"pipeline": ["dce", "cse"]}
    # timings are never saved (artifacts are byte-identical across compiles): a loaded model has none
    assert loaded.timings == {} and "seconds" not in (saved / MANIFEST).read_text()
    assert "pass_seconds" not in loaded.report() and "compile_seconds" not in loaded.report()
    assert loaded.lm is None
    (want,), (got,) = original.run("main", [X]), loaded.run("main", [X])
    assert want.tobytes() == got.tobytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_modules())
def test_round_trip_property(case: tuple[Module, list[np.ndarray]]):
    module, args = case
    with tempfile.TemporaryDirectory() as tmp:
        compiled(module).save(Path(tmp) / "art")
        loaded = load_artifact(Path(tmp) / "art")
    assert loaded.module == module
    for want, got in zip(run_function(module, "main", args), loaded.run("main", args)):
        assert want.tobytes() == got.tobytes()


def test_language_model_round_trip(tmp_path: Path):
    language_model().save(tmp_path / "lm")
    loaded = load_artifact(tmp_path / "lm")
    assert loaded.is_language_model
    assert loaded.lm.eos_token_id == 1 and loaded.lm.bos_token_id is None
    assert loaded.tokenizer().encode("hello world", add_special_tokens=False).ids == [2, 3]
    prompt = np.array([[2]])
    assert np.asarray(loaded.generate(prompt, 5, eos_token_id=1)).tolist() == [[2, 3, 1]]


def test_overwrites_a_previous_artifact_and_drops_its_stale_files(saved: Path):
    (saved / "target").mkdir()
    (saved / "target" / "stale.bin").write_bytes(b"old")
    compiled().save(saved)
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST, WEIGHTS]
    assert [p.name for p in saved.parent.iterdir()] == ["art"]  # no staging leftovers
    load_artifact(saved)


def test_refuses_to_save_over_a_directory_that_is_no_artifact(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        compiled().save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_refuses_options_that_are_not_json(tmp_path: Path):
    with pytest.raises(ValueError, match="options.fn"):
        compiled(options={"fn": print}).save(tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_runtime_imports_neither_torch_nor_frontend_nor_passes():
    code = ("import sys, bitsmith.runtime.artifact; "
            "bad = [m for m in ('torch', 'bitsmith.frontend', 'bitsmith.passes') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- corruption of the data files ------------------------------------------------------------

def test_flipped_weight_byte(saved: Path):
    data = bytearray((saved / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (saved / WEIGHTS).write_bytes(bytes(data))
    expect_refusal(saved, WEIGHTS, "sha256")


def test_truncated_weights(saved: Path):
    (saved / WEIGHTS).write_bytes((saved / WEIGHTS).read_bytes()[:-7])
    expect_refusal(saved, WEIGHTS, "sha256")


def test_truncated_weights_behind_a_consistent_manifest(saved: Path):
    data = (saved / WEIGHTS).read_bytes()[:-7]
    (saved / WEIGHTS).write_bytes(data)
    edit_manifest(saved, lambda m: m["files"].update({WEIGHTS: hashlib.sha256(data).hexdigest()}))
    expect_refusal(saved, WEIGHTS, "not a readable safetensors file")


def test_tensor_table_mismatch_behind_a_consistent_manifest(saved: Path):
    edit_manifest(saved, lambda m: m["tensors"][0].update(shape=[4, 3]))
    expect_refusal(saved, WEIGHTS, "the manifest says float32[4, 3]")
    edit_manifest(saved, lambda m: m["tensors"][0].update(shape=[3, 4], sha256="0" * 64))
    expect_refusal(saved, WEIGHTS, "has sha256")


def test_missing_tokenizer_of_a_language_model(tmp_path: Path):
    language_model().save(tmp_path / "lm")
    (tmp_path / "lm" / TOKENIZER).unlink()
    expect_refusal(tmp_path / "lm", TOKENIZER, "missing")


def test_missing_directory_and_manifest(tmp_path: Path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_artifact(tmp_path / "nowhere")
    expect_refusal(tmp_path, MANIFEST, "missing")


# --- corruption of the manifest ---------------------------------------------------------------

@pytest.mark.parametrize("edit", [
    lambda m: m["options"].update(group_size=64),
    lambda m: m.update(ir=m["ir"].replace("silu", "relu")),
    lambda m: m.update(target="tvm-llvm"),
])
def test_any_manifest_edit_breaks_its_hash(saved: Path, edit):
    edit_manifest(saved, edit, resign=False)
    expect_refusal(saved, MANIFEST, "manifest_sha256")


def test_manifest_that_is_not_json(saved: Path):
    (saved / MANIFEST).write_text(read_json(saved)["ir"])
    expect_refusal(saved, MANIFEST, "not valid JSON")


def test_unsupported_format_version(saved: Path):
    edit_manifest(saved, lambda m: m.update(format_version=2))
    expect_refusal(saved, MANIFEST, "unsupported version 2")


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(options=[1]), "options: expected an object"),
    (lambda m: m.update(format_version=True), "format_version: expected an integer"),
    (lambda m: m.pop("op_counts"), "missing fields ['op_counts']"),
    (lambda m: m.update(extra=1), "unknown fields ['extra']"),
    (lambda m: m["tensors"][0].update(dtype="float8"), "tensors[0].dtype"),
    (lambda m: m["tensors"][0].update(shape=[3, -4]), "tensors[0].shape"),
    (lambda m: m["files"].update({"../escape.so": "0" * 64}), "is not a relative name"),
    (lambda m: m["files"].update({"other.bin": "0" * 64}), "neither"),
    (lambda m: m.update(language_model={"bos_token_id": None, "eos_token_id": "1", "has_tokenizer": False}),
     "language_model.eos_token_id"),
])
def test_wrong_schema(saved: Path, edit, words: str):
    edit_manifest(saved, edit)
    expect_refusal(saved, MANIFEST, words)


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(ir=m["ir"].replace("func @main", "func main")), "does not parse"),
    (lambda m: m.update(ir=m["ir"].replace("f32[batch,3]\n", "f32[batch,5]\n", 1)), "does not verify"),
    (lambda m: m.update(module_attrs={"kind": "causal_lm"}), "module_attrs differ"),
    (lambda m: m.update(op_counts={"silu": 1}), "op_counts differ"),
    (lambda m: m.update(backend="other"), "built by backend 'other'"),
])
def test_inconsistent_ir_behind_a_consistent_manifest(saved: Path, edit, words: str):
    edit_manifest(saved, edit)
    expect_refusal(saved, MANIFEST, words)


def test_read_manifest_reads_no_weights(saved: Path):
    (saved / WEIGHTS).unlink()
    assert read_manifest(saved)["target"] == "reference"


# --- target files: hash-checked before the backend sees them ------------------------------------

class FileExecutable(Executable):
    def __init__(self, module: Module, files: Mapping[str, bytes]) -> None:
        self.module, self._files = module, dict(files)

    def run(self, function: str, args):
        return run_function(self.module, function, args)

    def files(self) -> dict[str, bytes]:
        return dict(self._files)


class FileBackend(Backend):
    name, targets = "native", ("native-sim",)
    LIBRARY = {"kernels/lib.so": b"\x7fELF pretend native code", "program.bin": bytes(range(256))}

    def __init__(self) -> None:
        self.loaded: list[dict[str, bytes]] = []

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        return FileExecutable(module, self.LIBRARY)

    def load(self, module, target, options, files) -> Executable:
        self.loaded.append(dict(files))
        return FileExecutable(module, files)


@pytest.fixture
def native(tmp_path: Path, monkeypatch) -> tuple[FileBackend, Path]:
    backend = FileBackend()
    monkeypatch.setattr(artifact, "backend_for_target", lambda target: backend)
    module = small_module()
    cm = type(compiled())(module, backend.build(module, "native-sim", {}), "native-sim")
    cm.save(tmp_path / "art")
    return backend, tmp_path / "art"


def test_target_files_round_trip(native):
    backend, path = native
    assert sorted(read_json(path)["files"]) == ["target/kernels/lib.so", "target/program.bin", WEIGHTS]
    load_artifact(path)
    assert backend.loaded == [FileBackend.LIBRARY]


def test_tampered_native_code_never_reaches_the_backend(native):
    backend, path = native
    (path / "target" / "kernels" / "lib.so").write_bytes(b"\x7fELF evil")
    expect_refusal(path, "target/kernels/lib.so", "sha256")
    assert backend.loaded == []


def test_save_refuses_target_file_names_that_escape(tmp_path: Path, monkeypatch):
    backend = FileBackend()
    monkeypatch.setattr(artifact, "backend_for_target", lambda target: backend)
    monkeypatch.setattr(FileBackend, "LIBRARY", {"../lib.so": b""})
    module = small_module()
    cm = type(compiled())(module, backend.build(module, "native-sim", {}), "native-sim")
    with pytest.raises(ValueError, match="not a relative name"):
        save_artifact(cm, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_strict_sorted_json(saved: Path):
    text = (saved / MANIFEST).read_text()
    manifest = json.loads(text)
    assert list(manifest) == sorted(manifest)
    assert manifest["files"].keys() == {WEIGHTS}
