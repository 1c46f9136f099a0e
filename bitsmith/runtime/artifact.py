"""Saving a CompiledModel as an artifact directory and loading it back, every byte checked.

Layout and validation rules: ``docs/artifact-format.md``. Loading never unpickles and never
evaluates manifest text; target files reach the backend only after their sha256 matched the
manifest, and native code (declared in the manifest's ``native`` field) only after the trust
decision of ``trust.py`` (this machine built it, the user trusted it, or the caller passed
``trust_native_code=True``); the backend loads it through ``backends/native_loader.py``. Weights are read with safetensors, never ``torch.load``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from ..backends import native_loader
from ..backends.base import backend_for_target
from ..errors import ArtifactError
from ..ir import IRParseError, Module, TensorTable, VerificationError, parse_module, print_module, verify_module
from ..ir.types import IRTypeError
from ..version import __version__
from .manifest import (FORMAT_VERSION, HASH_FIELD, MANIFEST, TARGET_DIR, TOKENIZER, WEIGHTS,
                       check_relative_name, json_subset, manifest_hash, read_manifest, to_json_value)
from . import trust
from .model import CompiledModel, LanguageModelInfo

__all__ = ["load_artifact", "op_counts", "read_manifest", "save_artifact", "verify_files"]

_ARTIFACT_ENTRIES = frozenset({MANIFEST, WEIGHTS, TOKENIZER, TARGET_DIR})
_CHUNK = 1 << 20


def op_counts(module: Module) -> dict[str, int]:
    counts = collections.Counter(n.op for f in module.functions for n in f.nodes)
    return dict(sorted(counts.items()))


def _sha256_file(file: Path, keep: bool = False) -> tuple[str, bytes | None]:
    digest, chunks = hashlib.sha256(), []
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            if keep:
                chunks.append(chunk)
    return digest.hexdigest(), (b"".join(chunks) if keep else None)


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
            "has_tokenizer": lm.tokenizer_json is not None},
        "compile_info": json_subset(dict(cm.compile_info)),
        "native": {f"{TARGET_DIR}/{check_relative_name(name)}": spec.to_json()
                   for name, spec in sorted(cm.executable.native_files().items())},
    }


def _write_payload(staging: Path, cm: CompiledModel) -> dict[str, str]:
    """Writes weights, tokenizer and target files; returns {relative name: sha256}."""
    files: dict[str, str] = {}
    tensors = cm.module.tensors
    safetensors.numpy.save_file({n: np.asarray(tensors[n]) for n in tensors}, str(staging / WEIGHTS))
    files[WEIGHTS] = _sha256_file(staging / WEIGHTS)[0]
    blobs: dict[str, bytes] = {}
    if cm.lm is not None and cm.lm.tokenizer_json is not None:
        blobs[TOKENIZER] = cm.lm.tokenizer_json.encode("utf-8")
    for name, data in cm.executable.files().items():
        blobs[f"{TARGET_DIR}/{check_relative_name(name)}"] = bytes(data)
    for name, data in blobs.items():
        file = staging / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        files[name] = hashlib.sha256(data).hexdigest()
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
        g = native_loader.granted(digest)
        if g is None or g.origin != native_loader.TRUSTED_CALLER:
            digests[digest] = f"written by this machine's bitsmith: {name}"
    if digests:
        trust.add(digests)


# --- loading -----------------------------------------------------------------------------

def verify_files(path: str | os.PathLike[str], manifest: dict[str, Any],
                 keep: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Checks that every file the manifest lists exists and matches its sha256.

    Returns the bytes of the files named in ``keep`` (read once, so what was hashed is
    exactly what the caller gets). Reads bytes only: nothing is loaded or executed.
    """
    root, kept = Path(path), {}
    for name, expected in sorted(manifest["files"].items()):
        file = root / name
        if not file.is_file():
            raise ArtifactError(str(file), "missing (manifest.json lists it)")
        actual, data = _sha256_file(file, keep=name in keep)
        if actual != expected:
            raise ArtifactError(str(file), f"sha256 {actual} does not match the manifest's {expected} "
                                           "(the file is corrupted, truncated or replaced)")
        if data is not None:
            kept[name] = data
    return kept


def _load_weights(file: Path, listed: list[dict[str, Any]]) -> TensorTable:
    where = str(file)
    try:
        arrays = safetensors.numpy.load_file(where)
    except (safetensors.SafetensorError, OSError, TypeError, ValueError) as e:
        raise ArtifactError(where, f"not a readable safetensors file: {e}") from None
    expected = {t["name"]: t for t in listed}
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ArtifactError(where, f"tensors differ from the manifest's table: missing {missing}, unlisted {extra}")
    try:
        table = TensorTable(arrays)
    except IRTypeError as e:
        raise ArtifactError(where, f"holds a tensor of a dtype the IR does not know: {e}") from None
    for name, t in expected.items():
        info = table.info(name)
        if list(info.shape) != t["shape"] or info.dtype != t["dtype"]:
            raise ArtifactError(where, f"tensor {name!r} is {info.dtype}{list(info.shape)} but the manifest "
                                       f"says {t['dtype']}{t['shape']}")
        if info.sha256 != t["sha256"]:
            raise ArtifactError(where, f"tensor {name!r} has sha256 {info.sha256}, the manifest says {t['sha256']}")
    return table


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


def _language_model(root: Path, manifest: dict[str, Any], blobs: dict[str, bytes]) -> LanguageModelInfo | None:
    lm = manifest["language_model"]
    if lm is None:
        return None
    tokenizer_json = None
    if lm["has_tokenizer"]:
        try:
            tokenizer_json = blobs[TOKENIZER].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(str(root / TOKENIZER), f"not UTF-8 text: {e}") from None
    return LanguageModelInfo(tokenizer_json, lm["bos_token_id"], lm["eos_token_id"])


def load_artifact(path: str | os.PathLike[str], trust_native_code: bool = False) -> CompiledModel:
    """Loads an artifact directory written by ``save_artifact``, refusing any inconsistency.

    Order: manifest (schema, version, self-hash); the trust decision for its native files
    (``trust.check_artifact``: UntrustedNativeCodeError unless every one is in the local trust
    store or ``trust_native_code`` is true); every listed file's sha256; weights
    against the tensor table; IR text parsed against the weights and verified; then the
    target's backend rebuilds the executable from the checked target files. Raises
    ArtifactError naming the bad file; UnknownTargetError when no installed backend serves
    the artifact's target.
    """
    root = Path(path)
    manifest = read_manifest(root)
    where = str(root / MANIFEST)
    natives = trust.check_artifact(str(root), manifest, trust_native_code)
    blobs = verify_files(root, manifest, keep=frozenset(n for n in manifest["files"] if n != WEIGHTS))
    tensors = _load_weights(root / WEIGHTS, manifest["tensors"])
    module = _load_module(where, manifest, tensors)
    lm = _language_model(root, manifest, blobs)
    target = manifest["target"]
    backend = backend_for_target(target)
    if backend.name != manifest["backend"]:
        raise ArtifactError(where, f"built by backend {manifest['backend']!r}, but target {target!r} is "
                                   f"served here by backend {backend.name!r}")
    prefix = TARGET_DIR + "/"
    target_files = {n[len(prefix):]: data for n, data in blobs.items() if n.startswith(prefix)}
    options = dict(manifest["options"])
    for native, origin in natives:  # hashes verified above: the loader may now load these bytes
        native_loader.grant(native.sha256, native.spec, origin)
    executable = backend.load(module, target, options, target_files)
    return CompiledModel(module, executable, target, options, lm, dict(manifest["compile_info"]))
