"""Captured GGUF models kept under ``$BITSMITH_CACHE_DIR/captures``, so that compiling the same
model again skips importing torch and transformers, building the HF model and torch.export.

An entry is keyed by the sha256 of the model file's bytes, of the source of the packages that
turn a file into IR (``frontend``, ``gguf``, ``ir``) and of the torch / transformers versions:
another file, other capture code or another exporter never hits an old entry. An entry is IR
text (``parse_module``), a safetensors tensor table and a JSON file; nothing is unpickled or
evaluated, and an entry that does not read back whole is ignored (captured again, rewritten).
Entries are written to a temporary folder and renamed into place, so concurrent compiles see a
whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .captured import CapturedModel

FORMAT = "bitsmith-capture-1"
_CODE_PACKAGES = ("frontend", "gguf", "ir")
_VERSIONED = ("torch", "transformers", "gguf", "tokenizers")  # everything a capture's bytes come from
KEEP_ENTRIES = 4  # an entry holds the model's float weights: older ones are removed on store


def cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "bitsmith") / "captures"


def _code_fingerprint() -> bytes:
    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for sub in _CODE_PACKAGES:
        for path in sorted((package / sub).rglob("*.py")):
            h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in _VERSIONED:
        try:
            h.update(f"{dist}={metadata.version(dist)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=-\0".encode())
    return h.digest()


def capture_key(model_file: Path, name: str) -> str:
    """The entry name of ``model_file`` captured under ``name`` by this code."""
    h = hashlib.sha256(FORMAT.encode() + b"\0" + name.encode() + b"\0")
    with open(model_file, "rb") as f:
        h.update(hashlib.file_digest(f, "sha256").digest())
    h.update(_code_fingerprint())
    return h.hexdigest()[:32]


class DeferredBlocks(Mapping[str, Any]):
    """A cached capture's GGUF blocks (``source_weights``): the file is opened only when a pass
    reads them (quant="gguf"), under the tensor-table names recorded at capture."""

    def __init__(self, model_file: Path, sources: Mapping[str, str]) -> None:
        self.model_file, self.sources = model_file, dict(sources)
        self._blocks: Mapping[str, Any] | None = None

    def _open(self) -> Mapping[str, Any]:
        if self._blocks is None:
            from .gguf_loader import LazyBlocks, read_gguf
            weights = read_gguf(self.model_file)
            found = weights.quantized.sources
            self._blocks = LazyBlocks(weights.file, {name: found[src] for name, src in self.sources.items()})
        return self._blocks

    def __getitem__(self, name: str) -> Any:
        return self._open()[name]

    def __contains__(self, name: object) -> bool:
        return name in self.sources  # Mapping's default would decode the tensor to answer

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


def load(key: str, model_file: Path) -> CapturedModel | None:
    """The cached capture ``key`` (None: absent or unreadable)."""
    from safetensors.numpy import load_file

    from ..ir import TensorTable, parse_module
    entry = cache_dir() / key
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            return None
        tensors = TensorTable(load_file(str(entry / "tensors.safetensors")))
        module = parse_module((entry / "module.ir").read_text(encoding="utf-8"), tensors)
    except Exception:  # a damaged or foreign entry: capture again
        return None
    sources = meta.get("sources")
    return CapturedModel(module, meta.get("tokenizer_json"), meta.get("bos_token_id"), meta.get("eos_token_id"),
                         meta.get("chat_template"), {}, tuple(meta.get("passes", ())),
                         None if sources is None else DeferredBlocks(model_file, sources))


def _prune(root: Path, keep: str) -> None:
    """Removes all but the ``KEEP_ENTRIES`` most recently written entries (``keep`` always stays)."""
    entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != keep),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_ENTRIES - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def store(key: str, captured: CapturedModel, sources: Mapping[str, str] | None) -> None:
    """Writes ``captured`` as entry ``key``; ``sources``: tensor-table name -> the GGUF tensor's
    name in ``read_gguf``'s table (what ``DeferredBlocks`` reopens). A failed write costs only time."""
    from safetensors.numpy import save_file

    from ..ir import print_module
    root = cache_dir()
    meta = {"format": FORMAT, "tokenizer_json": captured.tokenizer_json, "bos_token_id": captured.bos_token_id,
            "eos_token_id": captured.eos_token_id, "chat_template": captured.chat_template,
            "passes": list(captured.passes), "sources": None if sources is None else dict(sources)}
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        tensors = captured.module.tensors
        save_file({name: np.ascontiguousarray(tensors[name]) for name in tensors}, str(tmp / "tensors.safetensors"))
        (tmp / "module.ir").write_text(print_module(captured.module), encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        if (root / key).exists():
            shutil.rmtree(root / key, ignore_errors=True)
        os.replace(tmp, root / key)
        tmp = None
        _prune(root, key)
    except OSError:
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
