"""Saving a CompiledModel as an artifact directory and loading it back, every byte checked.

Layout and validation rules: ``docs/artifact-format.md``. Loading never unpickles and never
evaluates manifest text; every file is opened inside the directory without following links
(``artifact_files``), size-checked before it is read and hash-checked over the bytes that are
used; target files reach the backend only after that, and native code (declared in the
manifest's ``native`` field) only after the trust decision of ``trust.py`` (this machine built
it, the user trusted it, or the caller passed ``trust_native_code=True``); the backend loads it
through ``backends/native_loader.py``, which hashes the bytes it is given. Weights are parsed
by ``weights_file`` (written with safetensors), never ``torch.load``ed.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..backends import native_loader
from ..backends.base import Backend, backend_for_target
from ..errors import ArtifactError, OptionError, UnknownTargetError
from ..ir import IRParseError, IRTypeError, Module, TensorTable, VerificationError, parse_module, print_module, verify_module
from ..version import __version__
from .manifest import (CHAT_TEMPLATE, FORMAT_VERSION, HASH_FIELD, MANIFEST, TARGET_DIR, TOKENIZER, WEIGHTS,
                       check_relative_name, json_subset, manifest_hash, read_manifest, to_json_value)
from . import trust
from .artifact_files import ArtifactFiles, FileEntry, check_size, open_file, read_bytes, read_checked
from .model import CompiledModel, LanguageModelInfo
from .weights_file import read_weights
from .weights_writer import digest_cache_dir, write_weights

__all__ = ["NativeArtifactError", "file_entries", "load_artifact", "op_counts", "read_manifest", "save_artifact",
           "verify_files"]

_ARTIFACT_ENTRIES = frozenset({MANIFEST, WEIGHTS, TOKENIZER, CHAT_TEMPLATE, TARGET_DIR})


def op_counts(module: Module) -> dict[str, int]:
    counts = collections.Counter(n.op for f in module.functions for n in f.nodes)
    return dict(sorted(counts.items()))


# --- saving ------------------------------------------------------------------------------

def _check_destination(dest: Path) -> None:
    """Refuses to replace anything but nothing, an empty directory or a previous artifact."""
    if dest.is_symlink():
        raise ArtifactError(str(dest), "is a symbolic link; give the directory it points to")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ArtifactError(str(dest), "exists and is not a directory; refusing to overwrite it")
    entries = {p.name for p in dest.iterdir()}
    if entries and (MANIFEST not in entries or not entries <= _ARTIFACT_ENTRIES):
        raise ArtifactError(str(dest), "directory is not empty and does not hold a bitsmith artifact; "
                                       "refusing to overwrite it (choose an empty or new directory)")


def _manifest_body(cm: CompiledModel, backend_name: str) -> dict[str, Any]:
    """Every manifest field but ``files`` and the hash; raises ValueError on non-JSON options."""
    lm = cm.lm
    return {
        "format_version": FORMAT_VERSION,
        "bitsmith_version": __version__,
        "target": cm.target,
        "backend": backend_name,
        "options": to_json_value(dict(cm.options), "options"),
        "module_attrs": to_json_value(dict(cm.module.attrs), "module attrs"),
        "op_counts": op_counts(cm.module),
        "ir": print_module(cm.module),
        "tensors": [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "sha256": i.sha256}
                    for i in cm.module.tensors.infos()],
        "language_model": None if lm is None else {
            "bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id,
            "has_tokenizer": lm.tokenizer_json is not None,
            **({"has_chat_template": True} if lm.chat_template is not None else {})},
        "compile_info": json_subset(dict(cm.compile_info)),
        "native": {f"{TARGET_DIR}/{check_relative_name(name)}": spec.to_json()
                   for name, spec in sorted(cm.executable.native_files().items())},
    }


def _write_payload(staging: Path, cm: CompiledModel) -> dict[str, dict[str, Any]]:
    """Writes weights, tokenizer and target files; returns {relative name: {sha256, size}}."""
    files: dict[str, dict[str, Any]] = {}
    tensors = cm.module.tensors
    files[WEIGHTS] = write_weights(staging / WEIGHTS, tensors, digest_cache_dir())  # one tensor in memory at a time
    blobs: dict[str, bytes] = {}
    if cm.lm is not None and cm.lm.tokenizer_json is not None:
        blobs[TOKENIZER] = cm.lm.tokenizer_json.encode("utf-8")
    if cm.lm is not None and cm.lm.chat_template is not None:
        blobs[CHAT_TEMPLATE] = cm.lm.chat_template.encode("utf-8")
    for name, data in cm.executable.files().items():
        # bytes-like target files (e.g. stored operands viewing their arrays) are written without a copy
        blobs[f"{TARGET_DIR}/{check_relative_name(name)}"] = data if isinstance(data, (bytes, memoryview)) else bytes(data)
    for name, data in blobs.items():
        file = staging / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": memoryview(data).nbytes}
    return files


def _swap_in(staging: Path, dest: Path) -> None:
    """Moves the finished staging directory to ``dest``, replacing a previous artifact there."""
    if not dest.exists():
        os.rename(staging, dest)
        return
    old = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
    os.rename(dest, old)
    try:
        os.rename(staging, dest)
    except OSError:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_artifact(cm: CompiledModel, path: str | os.PathLike[str]) -> None:
    """Writes ``cm`` as an artifact directory at ``path`` (created with missing parents).

    ``path`` may be new, an empty directory, or a previous artifact (replaced as a whole, so
    no stale target file survives); anything else raises ArtifactError. Options must be
    JSON values (ValueError otherwise); compile_info keeps only its JSON-able entries.
    """
    dest = Path(path)
    _check_destination(dest)
    body = _manifest_body(cm, backend_for_target(cm.target).name)
    dest = Path(os.path.abspath(dest))  # "." and "x/.." have no name to build a sibling from
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        body["files"] = _write_payload(staging, cm)
        missing = sorted(set(body["native"]) - set(body["files"]))
        if missing:
            raise ValueError(f"the executable declares native files it does not write: {missing}")
        body[HASH_FIELD] = manifest_hash(body)
        text = json.dumps(body, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"
        (staging / MANIFEST).write_text(text, encoding="ascii")
        _swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _trust_written(body)


def _trust_written(body: dict[str, Any]) -> None:
    """Adds the digests of the native files just written to the local trust store, except
    those this process holds only because a caller trusted them for one load
    (``trust_native_code=True``): saving must not turn that into lasting trust."""
    digests = {}
    for name in body["native"]:
        digest = trust.file_sha256(body["files"][name])
        g = native_loader.granted(digest)  # fail closed: bytes nobody granted earn no trust
        if g is not None and g.origin != native_loader.TRUSTED_CALLER:
            digests[digest] = f"written by this machine's bitsmith: {name}"
    if digests:
        trust.add(digests)


# --- loading -----------------------------------------------------------------------------

class NativeArtifactError(ArtifactError):
    """The artifact's native code cannot load here; ``__cause__`` is the native loader's error
    (``UnsupportedCPUError`` for an instruction set this CPU lacks, ``NativeCodeError`` for a
    library the manifest does not declare)."""


def file_entries(manifest: dict[str, Any]) -> dict[str, FileEntry]:
    return {n: FileEntry(e["sha256"], e["size"]) for n, e in manifest["files"].items()}


def verify_files(path: str | os.PathLike[str], manifest: dict[str, Any], skip: frozenset[str] = frozenset()) -> None:
    """Checks that every file the manifest lists (but those in ``skip``) is a regular file inside
    the artifact with its recorded size and sha256. Streams: reads bytes, keeps none, runs nothing."""
    root = Path(path)
    for name, entry in sorted(file_entries(manifest).items()):
        if name not in skip:
            read_checked(root, name, entry)


def _check_present(root: Path, entries: dict[str, FileEntry]) -> None:
    """Every listed file is a regular file inside the artifact of its recorded size (reads nothing)."""
    for name, entry in sorted(entries.items()):
        fd = open_file(root, name)
        try:
            check_size(fd, str(root / name), entry.size)
        finally:
            os.close(fd)


def _load_module(where: str, manifest: dict[str, Any], tensors: TensorTable) -> Module:
    try:
        module = verify_module(parse_module(manifest["ir"], tensors))
    except IRParseError as e:
        raise ArtifactError(where, f"ir: does not parse: {e}") from None
    except VerificationError as e:
        raise ArtifactError(where, f"ir: does not verify: {e}") from None
    if module.tensors != tensors:
        raise ArtifactError(where, "ir: its tensor lines do not list exactly the tensors of the table")
    try:
        attrs = to_json_value(dict(module.attrs), "module attrs")
    except ValueError as e:
        raise ArtifactError(where, f"ir: {e}") from None
    if attrs != manifest["module_attrs"]:
        raise ArtifactError(where, "module_attrs differ from the attrs in the IR text")
    if op_counts(module) != manifest["op_counts"]:
        raise ArtifactError(where, "op_counts differ from the ops in the IR text")
    return module


def _language_model(root: Path, manifest: dict[str, Any], entries: dict[str, FileEntry]) -> LanguageModelInfo | None:
    lm = manifest["language_model"]
    if lm is None:
        return None
    tokenizer_json = _text_file(root, TOKENIZER, entries) if lm["has_tokenizer"] else None
    template = _text_file(root, CHAT_TEMPLATE, entries) if lm.get("has_chat_template", False) else None
    return LanguageModelInfo(tokenizer_json, lm["bos_token_id"], lm["eos_token_id"], template)


def _text_file(root: Path, name: str, entries: dict[str, FileEntry]) -> str:
    try:
        return read_bytes(root, name, entries[name]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(str(root / name), f"not UTF-8 text: {e}") from None


def _backend(where: str, manifest: dict[str, Any]) -> Backend:
    target = manifest["target"]
    try:
        backend = backend_for_target(target)
    except UnknownTargetError as e:
        raise ArtifactError(where, f"target: {e} (install the backend plugin that serves it)") from None
    if backend.name != manifest["backend"]:
        raise ArtifactError(where, f"built by backend {manifest['backend']!r}, but target {target!r} is "
                                   f"served here by backend {backend.name!r}")
    return backend


def supplied_weights(where: str, listed: list[dict[str, Any]], weights: Mapping[str, np.ndarray]) -> TensorTable:
    """The tensor table from arrays the caller regenerated (e.g. seeded weights, see
    ``bitsmith.testing.seeded_llama``) in place of weights.safetensors: exactly the manifest's
    tensors, each with its listed shape, dtype and data sha256 (the manifest hashes itself, so the
    arrays are the bytes the artifact was compiled against)."""
    expected = {t["name"]: t for t in listed}
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ArtifactError(where, f"supplied weights differ from the manifest's table: missing {missing[:5]}, "
                                   f"unlisted {[x[:80] for x in extra[:5]]}")
    try:
        table = TensorTable({n: np.ascontiguousarray(a) for n, a in weights.items()})
    except IRTypeError as e:
        raise ArtifactError(where, f"a supplied weight has a dtype the IR does not know: {e}") from None
    for name, t in expected.items():
        info = table.info(name)
        if list(info.shape) != t["shape"] or info.dtype != t["dtype"]:
            raise ArtifactError(where, f"supplied tensor {name!r} is {info.dtype}{list(info.shape)} but the manifest "
                                       f"says {t['dtype']}{t['shape']}")
        if info.sha256 != t["sha256"]:
            raise ArtifactError(where, f"supplied tensor {name!r}: its data's sha256 differs from the manifest's")
    return table


def load_artifact(path: str | os.PathLike[str], trust_native_code: bool = False,
                  threads: int | None = None, weights: Mapping[str, np.ndarray] | None = None) -> CompiledModel:
    """Loads an artifact directory written by ``save_artifact``, refusing any inconsistency.

    Order: manifest (size cap, version, self-hash, schema); the trust decision for its native
    files (``trust.check_artifact``: UntrustedNativeCodeError unless every one is in the local
    trust store or ``trust_native_code`` is true); every listed file present, a regular file
    inside the directory, of its recorded size; weights read once (hashed as they stream in)
    against the tensor table; IR text parsed against the weights and verified; the target's
    backend rebuilds the executable, reading target files lazily through an ``ArtifactFiles``
    view that hash-checks each file it returns (the native loader loads only granted digests);
    finally every listed file the backend did not read is hash-checked (streamed). Raises
    ArtifactError naming the bad file (also when no installed backend serves the target, or a
    stored option is invalid). ``threads`` replaces the stored ``threads`` option (CPU kernel
    threads, 0: every core) of targets that have one; others refuse it (ValueError).
    ``weights`` (name -> array) replaces weights.safetensors, which may then be absent: each
    array must match the manifest's tensor table, sha256 included (``supplied_weights``).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a non-negative integer (0: every core), got {threads!r}")
    root = Path(path)
    manifest = read_manifest(root)
    where = str(root / MANIFEST)
    natives = trust.check_artifact(str(root), manifest, trust_native_code)
    entries = file_entries(manifest)
    if weights is not None:
        entries.pop(WEIGHTS, None)
    _check_present(root, entries)
    backend = _backend(where, manifest)
    tensors = (read_weights(root, entries[WEIGHTS], manifest["tensors"]) if weights is None
               else supplied_weights(where, manifest["tensors"], weights))
    module = _load_module(where, manifest, tensors)
    lm = _language_model(root, manifest, entries)
    files = ArtifactFiles(root, entries, TARGET_DIR + "/")
    options = dict(manifest["options"])
    target = manifest["target"]
    if threads is not None:
        if "threads" not in options:
            raise ValueError(f"target {target!r} has no thread setting (its kernels run on numpy or a "
                             "device); drop --threads / threads=, or set OPENBLAS_NUM_THREADS before starting")
        options["threads"] = threads
    for native, origin in natives:  # the loader hashes what it is given: only these digests load
        native_loader.grant(native.sha256, native.spec, origin)
    try:
        executable = backend.load(module, target, options, files)
    except OptionError as e:
        raise ArtifactError(where, f"options: {e}") from None
    except native_loader.NativeCodeError as e:  # undeclared library, or an ISA this CPU lacks
        raise NativeArtifactError(where, f"native: {e}") from e
    verify_files(root, manifest, skip=frozenset(files.read | {WEIGHTS, TOKENIZER, CHAT_TEMPLATE}))
    return CompiledModel(module, executable, target, options, lm, dict(manifest["compile_info"]))
