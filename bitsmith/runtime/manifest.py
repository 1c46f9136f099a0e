"""The artifact manifest: its fields, its self-hash and the schema check every reader runs.

``docs/artifact-format.md`` is the written spec; this module is its decoder. Reading a manifest
touches only ``manifest.json``: no weights, no target files, no native code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..errors import ArtifactError
from ..ir.types import DTYPES

FORMAT_VERSION = 2   # 2: files entries are {sha256, size}; reads are bounded (docs/artifact-format.md)
MAX_MANIFEST_BYTES = 64 << 20   # SmolLM2-135M's manifest is ~0.4 MiB; refused unread above this
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"   # optional (language_model.has_chat_template)
TARGET_DIR = "target"

HASH_FIELD = "manifest_sha256"
FIELDS = ("format_version", "bitsmith_version", "target", "backend", "options", "module_attrs",
          "op_counts", "ir", "tensors", "files", "native", "language_model", "compile_info", HASH_FIELD)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NAME_PART = re.compile(r"[A-Za-z0-9_.\-]+")


def canonical_json(obj: Any) -> bytes:
    """The bytes a manifest hash is taken over: sorted keys, no whitespace, strict JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != HASH_FIELD}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def check_relative_name(name: str) -> str:
    """Returns ``name`` if it is a safe relative file name (``a/b.bin``), else raises ValueError.

    Parts are ``[A-Za-z0-9_.-]+`` and never ``.`` or ``..``, so a name cannot leave the
    artifact directory whatever a manifest says.
    """
    parts = name.split("/") if isinstance(name, str) else [None]
    if not all(isinstance(p, str) and _NAME_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"file name {name!r} is not a relative name made of [A-Za-z0-9_.-] parts")
    return name


def to_json_value(value: Any, where: str) -> Any:
    """A manifest copy of ``value``: tuples become lists; anything not strict JSON raises ValueError."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number; a manifest holds strict JSON")
        return value
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return to_json_value(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string")
            out[k] = to_json_value(v, f"{where}.{k}")
        return out
    raise ValueError(f"{where}: {type(value).__name__} value {value!r} cannot be stored in a manifest")


def json_subset(value: Any) -> Any:
    """Like ``to_json_value`` but drops (instead of refusing) what JSON cannot hold."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, str):
                try:
                    out[k] = json_subset(v)
                except ValueError:
                    continue
        return out
    if isinstance(value, (list, tuple)):
        return [json_subset(v) for v in value]
    return to_json_value(value, "value")


# --- reading -----------------------------------------------------------------------------

def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not strict JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Checker:
    """Raises ArtifactError(manifest path, 'field: problem') on the first schema violation."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> None:
        raise ArtifactError(self.path, f"{field}: {problem}")

    def require(self, ok: bool, field: str, problem: str) -> None:
        if not ok:
            self.fail(field, problem)

    def keys(self, obj: Any, field: str, expected: set[str]) -> dict[str, Any]:
        self.require(isinstance(obj, dict), field, f"expected an object, got {type(obj).__name__}")
        missing, unknown = sorted(expected - set(obj)), sorted(set(obj) - expected)
        self.require(not missing, field, f"missing fields {missing}")
        self.require(not unknown, field, f"unknown fields {unknown}")
        return obj

    def typed(self, value: Any, field: str, test: Callable[[Any], bool], what: str) -> Any:
        self.require(test(value), field, f"expected {what}, got {json.dumps(value)[:80]}")
        return value


def _check_tensors(c: _Checker, tensors: Any) -> None:
    c.typed(tensors, "tensors", lambda v: isinstance(v, list), "a list")
    seen: set[str] = set()
    for i, t in enumerate(tensors):
        where = f"tensors[{i}]"
        c.keys(t, where, {"name", "shape", "dtype", "sha256"})
        c.typed(t["name"], f"{where}.name", lambda v: isinstance(v, str) and v != "", "a non-empty string")
        c.require(t["name"] not in seen, f"{where}.name", f"tensor {t['name']!r} listed twice")
        seen.add(t["name"])
        c.typed(t["shape"], f"{where}.shape",
                lambda v: isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v),
                "a list of non-negative integers")
        c.typed(t["dtype"], f"{where}.dtype", lambda v: isinstance(v, str) and v in DTYPES, f"one of {sorted(DTYPES)}")
        c.typed(t["sha256"], f"{where}.sha256", _is_sha256, "64 lowercase hex digits")


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and bool(_SHA256.fullmatch(v))


def _check_files(c: _Checker, files: Any, has_tokenizer: bool, has_chat_template: bool) -> None:
    c.typed(files, "files", lambda v: isinstance(v, dict), "an object")
    for name, entry in files.items():
        try:
            check_relative_name(name)
        except ValueError as e:
            c.fail("files", str(e))
        c.require(name in (WEIGHTS, TOKENIZER, CHAT_TEMPLATE) or name.startswith(TARGET_DIR + "/"),
                  "files", f"{name!r} is neither {WEIGHTS}, {TOKENIZER}, {CHAT_TEMPLATE} nor under {TARGET_DIR}/")
        where = f"files[{name!r}]"
        c.keys(entry, where, {"sha256", "size"})
        c.typed(entry["sha256"], f"{where}.sha256", _is_sha256, "64 lowercase hex digits")
        c.typed(entry["size"], f"{where}.size", lambda v: _is_int(v) and 0 <= v < 1 << 63,
                "a non-negative integer")
    c.require(WEIGHTS in files, "files", f"{WEIGHTS} is not listed")
    c.require((TOKENIZER in files) == has_tokenizer, "files",
              f"{TOKENIZER} must be listed exactly when language_model.has_tokenizer is true")
    c.require((CHAT_TEMPLATE in files) == has_chat_template, "files",
              f"{CHAT_TEMPLATE} must be listed exactly when language_model.has_chat_template is true")


def _check_native(c: _Checker, native: Any, files: dict[str, Any]) -> None:
    """``native``: {file name: NativeSpec JSON} for every native library among ``files``."""
    from ..backends.native_loader import NativeSpec
    c.typed(native, "native", lambda v: isinstance(v, dict), "an object")
    for name, spec in native.items():
        c.require(name in files and name.startswith(TARGET_DIR + "/"), "native",
                  f"{name!r} is not a target file listed in files")
        try:
            NativeSpec.from_json(spec)
        except ValueError as e:
            c.fail(f"native[{name!r}]", str(e))


def _check_schema(c: _Checker, m: dict[str, Any]) -> None:
    c.keys(m, "manifest", set(FIELDS))
    for name in ("bitsmith_version", "target", "backend", "ir"):
        c.typed(m[name], name, lambda v: isinstance(v, str) and v != "", "a non-empty string")
    for name in ("options", "module_attrs", "compile_info"):
        c.typed(m[name], name, lambda v: isinstance(v, dict), "an object")
    c.typed(m["op_counts"], "op_counts",
            lambda v: isinstance(v, dict) and all(_is_int(n) and n > 0 for n in v.values()),
            "an object of positive integers")
    _check_tensors(c, m["tensors"])
    lm = m["language_model"]
    if lm is not None:
        # has_chat_template is optional: artifacts written before chat templates travelled lack it
        c.keys(lm, "language_model", {"bos_token_id", "eos_token_id", "has_tokenizer"}
               | ({"has_chat_template"} & set(lm) if isinstance(lm, dict) else set()))
        for name in ("bos_token_id", "eos_token_id"):
            c.typed(lm[name], f"language_model.{name}", lambda v: v is None or (_is_int(v) and v >= 0),
                    "null or a non-negative integer")
        for name in ("has_tokenizer", "has_chat_template"):
            c.typed(lm.get(name, False), f"language_model.{name}", lambda v: isinstance(v, bool), "a boolean")
    _check_files(c, m["files"], lm is not None and lm["has_tokenizer"],
                 lm is not None and lm.get("has_chat_template", False))
    _check_native(c, m["native"], m["files"])


def strict_json(data: bytes) -> Any:
    """Parses UTF-8 JSON refusing NaN/Infinity and duplicate keys (ValueError otherwise)."""
    return json.loads(data.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)


def _read_manifest_bytes(root: Path) -> bytes:
    """manifest.json's bytes: a regular file in ``root`` (no link), at most MAX_MANIFEST_BYTES."""
    from .artifact_files import open_file  # (it imports this module)
    where = str(root / MANIFEST)
    try:
        fd = open_file(root, MANIFEST)
    except ArtifactError as e:
        raise ArtifactError(where, "missing") if "missing" in e.problem else e from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ArtifactError(where, f"{size} bytes is over the {MAX_MANIFEST_BYTES}-byte cap on a manifest "
                                       "(refused unread)")
        chunks, left = [], size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(where, f"grew over the {MAX_MANIFEST_BYTES}-byte cap while being read")
        return data
    finally:
        os.close(fd)


def _check_version(c: _Checker, version: Any) -> None:
    c.typed(version, "format_version", _is_int, "an integer")
    if version > FORMAT_VERSION:
        c.fail("format_version", f"the artifact has format version {version}, newer than version "
                                 f"{FORMAT_VERSION}, the newest this bitsmith reads; upgrade bitsmith to load it")
    if version < FORMAT_VERSION:
        c.fail("format_version", f"the artifact has format version {version}: it was written by an older "
                                 f"bitsmith; this one reads version {FORMAT_VERSION}. Recompile the model "
                                 "(bitsmith compile ... --out DIR) to load it")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of the artifact directory ``path``.

    Checks, in order: the directory and ``manifest.json`` exist, the latter a regular file (no
    symbolic link) of at most MAX_MANIFEST_BYTES; it is strict UTF-8 JSON without duplicate
    keys; ``format_version`` is supported; ``manifest_sha256`` matches the rest; every field has
    its type. It does not read weights or target files (see ``artifact.load_artifact`` for
    those checks). Raises ArtifactError naming the file.
    """
    root = Path(path)
    if not root.exists():
        raise ArtifactError(str(root), "no such artifact directory")
    if not root.is_dir():
        raise ArtifactError(str(root), "not a directory (an artifact is a directory)")
    where = str(root / MANIFEST)
    try:
        manifest = strict_json(_read_manifest_bytes(root))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(where, f"not valid JSON: {str(e)[:200]}") from None
    c = _Checker(where)
    c.typed(manifest, "manifest", lambda v: isinstance(v, dict), "a JSON object")
    _check_version(c, manifest.get("format_version"))
    c.typed(manifest.get(HASH_FIELD), HASH_FIELD, _is_sha256, "64 lowercase hex digits")
    try:
        digest = manifest_hash(manifest)
    except (ValueError, RecursionError) as e:  # e.g. a number JSON allows but canonical JSON cannot write
        c.fail(HASH_FIELD, f"the manifest cannot be hashed: {str(e)[:200]}")
    if digest != manifest[HASH_FIELD]:
        c.fail(HASH_FIELD, "does not match the manifest's contents (the manifest was edited or corrupted)")
    _check_schema(c, manifest)
    return manifest


def tensor_bytes(manifest: dict[str, Any]) -> int:
    """Total bytes of the tensor table a (validated) manifest describes."""
    return sum(math.prod(t["shape"]) * DTYPES[t["dtype"]][1].itemsize for t in manifest["tensors"])
