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
from bitsmith.backends.files import TargetFiles
from bitsmith.runtime import artifact, artifact_files
from bitsmith.runtime.artifact import load_artifact, read_manifest, save_artifact
from bitsmith.runtime.manifest import FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, TOKENIZER, WEIGHTS
from bitsmith.testing.strategies import random_modules

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
    expect_refusal(saved, WEIGHTS, "is 121 bytes, but the manifest says 128")


def test_appended_bytes(saved: Path):
    with open(saved / WEIGHTS, "ab") as f:
        f.write(b"\0")
    expect_refusal(saved, WEIGHTS, "is 129 bytes, but the manifest says 128")


def _resign_file(path: Path, name: str, data: bytes) -> None:
    (path / name).write_bytes(data)
    edit_manifest(path, lambda m: m["files"].update({name: {"sha256": hashlib.sha256(data).hexdigest(),
                                                            "size": len(data)}}))


def test_truncated_weights_behind_a_consistent_manifest(saved: Path):
    _resign_file(saved, WEIGHTS, (saved / WEIGHTS).read_bytes()[:-7])
    expect_refusal(saved, WEIGHTS, "data_offsets")


def _safetensors(header: Any, data: bytes = b"", pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text + data


@pytest.mark.parametrize("make, words", [
    (lambda: b"\1\2\3", "too short"),
    (lambda: (1 << 40).to_bytes(8, "little"), "header length"),
    (lambda: _safetensors([1]), "header: not a JSON object"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4]}}), "exactly dtype, shape, data_offsets"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F8", "shape": [3, 4], "data_offsets": [0, 48]}}, bytes(48)),
     "dtype"),
    (lambda: _safetensors({"fc.weight": {"dtype": ["F32"], "shape": [3, 4], "data_offsets": [0, 48]}}, bytes(48)),
     "dtype"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, -4], "data_offsets": [0, 48]}}, bytes(48)),
     "shape"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 44]}}, bytes(48)),
     "needs 48 bytes, its data_offsets span 44"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [4, 52]}}, bytes(48)),
     "data_offsets: expected [begin, end]"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [4, 52]}}, bytes(52)),
     "leaves a hole at byte 0"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                           "x": {"dtype": "F32", "shape": [2], "data_offsets": [40, 48]}}, bytes(48)),
     "overlaps"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}, bytes(52)),
     "cover 48 of the 52"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                           "x": {"dtype": "U8", "shape": [0], "data_offsets": [48, 48]}}, bytes(48)),
     "unlisted ['x']"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F64", "shape": [3, 2], "data_offsets": [0, 48]}}, bytes(48)),
     "is float64[3, 2] but the manifest says float32[3, 4]"),
    (lambda: _safetensors({"fc.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}}, bytes(48)),
     "data's sha256 differs"),
    (lambda: b"{}" + bytes(6), "header length"),
    (lambda: (16).to_bytes(8, "little") + b'{"a":1, "a":2}  ', "not valid JSON"),
])
def test_malformed_safetensors_behind_a_consistent_manifest(saved: Path, make, words: str):
    _resign_file(saved, WEIGHTS, make())
    expect_refusal(saved, WEIGHTS, words)


def test_weights_load_aligned_and_without_copies(saved: Path):
    tensors = load_artifact(saved).module.tensors
    for name in tensors:
        a = tensors[name]
        assert a.ctypes.data % 64 == 0 and not a.flags.writeable and not a.flags.owndata


def test_tensor_table_mismatch_behind_a_consistent_manifest(saved: Path):
    edit_manifest(saved, lambda m: m["tensors"][0].update(shape=[4, 3]))
    expect_refusal(saved, WEIGHTS, "the manifest says float32[4, 3]")
    edit_manifest(saved, lambda m: m["tensors"][0].update(shape=[3, 4], sha256="0" * 64))
    expect_refusal(saved, WEIGHTS, "data's sha256 differs")


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


def test_newer_format_version_names_both_versions(saved: Path):
    edit_manifest(saved, lambda m: m.update(format_version=FORMAT_VERSION + 1), resign=False)
    err = expect_refusal(saved, MANIFEST, f"format version {FORMAT_VERSION + 1}, newer than version {FORMAT_VERSION}")
    assert "upgrade bitsmith" in err.problem


def test_older_format_version_asks_for_a_recompile(saved: Path):
    edit_manifest(saved, lambda m: m.update(format_version=FORMAT_VERSION - 1), resign=False)
    err = expect_refusal(saved, MANIFEST, f"format version {FORMAT_VERSION - 1}: it was written by an older bitsmith")
    assert "Recompile" in err.problem


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(options=[1]), "options: expected an object"),
    (lambda m: m.update(format_version=True), "format_version: expected an integer"),
    (lambda m: m.pop("op_counts"), "missing fields ['op_counts']"),
    (lambda m: m.update(extra=1), "unknown fields ['extra']"),
    (lambda m: m["tensors"][0].update(dtype="float8"), "tensors[0].dtype"),
    (lambda m: m["tensors"][0].update(dtype=[]), "tensors[0].dtype"),  # unhashable: no TypeError (found by fuzzing)
    (lambda m: m["tensors"][0].update(shape=[3, -4]), "tensors[0].shape"),
    (lambda m: m["files"].update({"../escape.so": {"sha256": "0" * 64, "size": 0}}), "is not a relative name"),
    (lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64, "size": 0}}), "is not a relative name"),
    (lambda m: m["files"].update({"other.bin": {"sha256": "0" * 64, "size": 0}}), "neither"),
    (lambda m: m["files"].update({WEIGHTS: "0" * 64}), "files['weights.safetensors']: expected an object"),
    (lambda m: m["files"][WEIGHTS].update(size=-1), "files['weights.safetensors'].size"),
    (lambda m: m["files"][WEIGHTS].update(size=1.5), "files['weights.safetensors'].size"),
    (lambda m: m["files"][WEIGHTS].update(sha256="0" * 63), "files['weights.safetensors'].sha256"),
    (lambda m: m["files"][WEIGHTS].pop("size"), "missing fields ['size']"),
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
    expect_refusal(path, "target/kernels/lib.so", "is 9 bytes, but the manifest says 24")
    (path / "target" / "kernels" / "lib.so").write_bytes(b"\x7fELF evil of the same size"[:24])
    expect_refusal(path, "target/kernels/lib.so", "sha256 does not match")
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
    size = (saved / WEIGHTS).stat().st_size
    assert manifest["files"][WEIGHTS] == {"sha256": hashlib.sha256((saved / WEIGHTS).read_bytes()).hexdigest(),
                                          "size": size}


# --- only regular files inside the directory, sizes before reads -------------------------------

def _outside_secret(tmp_path: Path) -> tuple[Path, str]:
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"secret outside the artifact")
    return secret, hashlib.sha256(secret.read_bytes()).hexdigest()


def test_symlinked_weights_are_refused_and_the_target_never_described(saved: Path, tmp_path: Path):
    secret, digest = _outside_secret(tmp_path)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((saved / WEIGHTS).read_bytes())
    for target in (copy, secret):  # an identical file elsewhere, and an unrelated one
        (saved / WEIGHTS).unlink()
        (saved / WEIGHTS).symlink_to(target)
        err = expect_refusal(saved, WEIGHTS, "symbolic link")
        assert digest not in str(err) and str(target) not in str(err)


def test_a_manifest_entry_pointing_outside_is_never_hashed_into_a_message(native, tmp_path: Path):
    _, path = native
    secret, digest = _outside_secret(tmp_path)
    lib = path / "target" / "kernels" / "lib.so"
    lib.unlink()
    lib.symlink_to(secret)
    err = expect_refusal(path, "target/kernels/lib.so", "symbolic link")
    assert digest not in str(err)


def test_symlinked_directory_inside_the_artifact_is_refused(native, tmp_path: Path):
    _, path = native
    (path / "target" / "kernels").rename(tmp_path / "kernels")
    (path / "target" / "kernels").symlink_to(tmp_path / "kernels")
    expect_refusal(path, "target/kernels", "symbolic link")


def test_symlinked_manifest_is_refused(saved: Path, tmp_path: Path):
    (saved / MANIFEST).rename(tmp_path / "m.json")
    (saved / MANIFEST).symlink_to(tmp_path / "m.json")
    expect_refusal(saved, MANIFEST, "symbolic link")


def test_fifo_and_directory_are_not_regular_files(saved: Path):
    import os
    (saved / WEIGHTS).unlink()
    os.mkfifo(saved / WEIGHTS)  # opening it must not block waiting for a writer
    expect_refusal(saved, WEIGHTS, "not a regular file")
    (saved / WEIGHTS).unlink()
    (saved / WEIGHTS).mkdir()
    expect_refusal(saved, WEIGHTS, "not a regular file")


def test_oversized_manifest_is_refused_unread(saved: Path):
    with open(saved / MANIFEST, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk, would cost memory if read
    expect_refusal(saved, MANIFEST, "cap on a manifest (refused unread)")


def test_sparse_file_of_the_wrong_size_is_refused_before_it_is_read(native, monkeypatch):
    backend, path = native
    with open(path / "target" / "program.bin", "r+b") as f:
        f.truncate(400 << 20)
    reads = []
    monkeypatch.setattr(artifact_files.os, "readv", lambda *a: reads.append(a) or 0)
    expect_refusal(path, "target/program.bin", f"is {400 << 20} bytes, but the manifest says 256")
    assert reads == [] and backend.loaded == []


# --- lazy, verified target files -----------------------------------------------------------------

class LazyBackend(FileBackend):
    """Reads only what it is told to, through the TargetFiles interface."""

    want: tuple[str, ...] = ()

    def load(self, module, target, options, files) -> Executable:
        assert isinstance(files, TargetFiles)
        got = {n: files[n] for n in self.want}
        got.update({f"array:{n}": files.read_array(n, "uint8").tobytes() for n in self.want})
        self.loaded.append(got)
        return FileExecutable(module, {})


def test_target_files_are_read_when_asked_and_unread_ones_still_checked(native, monkeypatch):
    _, path = native
    backend = LazyBackend()
    monkeypatch.setattr(artifact, "backend_for_target", lambda target: backend)
    backend.want = ("program.bin",)
    load_artifact(path)
    assert backend.loaded[-1] == {"program.bin": bytes(range(256)), "array:program.bin": bytes(range(256))}
    data = bytearray((path / "target" / "kernels" / "lib.so").read_bytes())
    data[0] ^= 1
    (path / "target" / "kernels" / "lib.so").write_bytes(bytes(data))
    expect_refusal(path, "target/kernels/lib.so", "sha256 does not match")  # checked after the backend


def test_a_file_the_backend_reads_is_checked_before_it_gets_the_bytes(native, monkeypatch):
    _, path = native
    backend = LazyBackend()
    monkeypatch.setattr(artifact, "backend_for_target", lambda target: backend)
    backend.want = ("program.bin",)
    (path / "target" / "program.bin").write_bytes(bytes(255) + b"x")
    expect_refusal(path, "target/program.bin", "sha256 does not match")
    assert backend.loaded == []


def test_read_array_is_aligned_read_only_and_checks_its_shape(native, monkeypatch):
    _, path = native
    seen = {}

    class ArrayBackend(FileBackend):
        def load(self, module, target, options, files):
            seen["a"] = files.read_array("program.bin", "<u4", (8, 8))
            with pytest.raises(ArtifactError, match="needs 252"):
                files.read_array("program.bin", "<u4", (7, 9))
            with pytest.raises(ArtifactError, match="not a whole number"):
                files.read_array("program.bin", [("a", "<u4"), ("b", "u1")])
            seen["under"] = sorted(files.under("kernels/"))
            return FileExecutable(module, {})

    monkeypatch.setattr(artifact, "backend_for_target", lambda target: ArrayBackend())
    load_artifact(path)
    a = seen["a"]
    assert a.ctypes.data % 64 == 0 and not a.flags.writeable
    assert a.tobytes() == bytes(range(256)) and seen["under"] == ["lib.so"]


def test_a_stored_option_a_backend_refuses_is_an_artifact_error(native, monkeypatch):
    from bitsmith.errors import OptionError
    _, path = native

    class Picky(FileBackend):
        def load(self, module, target, options, files):
            raise OptionError("threads must be an int")

    monkeypatch.setattr(artifact, "backend_for_target", lambda target: Picky())
    expect_refusal(path, MANIFEST, "options: threads must be an int")


def test_unknown_target_is_an_artifact_error_listing_the_known_ones(saved: Path):
    edit_manifest(saved, lambda m: m.update(target="quantum-9000"))
    err = expect_refusal(saved, MANIFEST, "target: unknown target 'quantum-9000'; known targets:")
    assert "reference" in err.problem


def test_a_file_too_large_for_memory_is_an_artifact_error(saved: Path, monkeypatch):
    """A file whose (manifest- and fstat-agreed) size cannot be allocated: ArtifactError naming
    it, not a MemoryError escaping load()."""
    from bitsmith.runtime import weights_file

    def no_memory(n: int):
        raise MemoryError(n)

    monkeypatch.setattr(weights_file, "aligned_bytes", no_memory)
    err = expect_refusal(saved, WEIGHTS, "do not fit in this process's memory")
    assert err.path.endswith(WEIGHTS)
