"""An offloaded artifact: ``offload.json`` (targets, the schedule, hashes tying the pair) plus
two ordinary artifacts, ``dense/`` and ``attention/``, each built for its own target and
loaded (validated, trust-checked) by ``runtime/artifact.py``. Layout: docs/attention-offload.md.

Rank 0 loads ``dense/`` (and ``attention/`` when it runs attention itself); an attention worker
loads only ``attention/`` (no weights: the cache is its whole memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ArtifactError
from ..artifact import load_artifact, save_artifact
from ..manifest import MANIFEST, canonical_json, strict_json
from ..model import CompiledModel
from .schedule import Schedule

OFFLOAD_MANIFEST = "offload.json"
DENSE_DIR, ATTENTION_DIR = "dense", "attention"
FORMAT = "bitsmith-offload"
FORMAT_VERSION = 1
MAX_BYTES = 16 << 20
PREFILL = "attention"  # where prefill attention runs (docs/attention-offload.md, "Prefill")


def is_offload_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / OFFLOAD_MANIFEST).is_file()


@dataclass(frozen=True)
class OffloadManifest:
    dense_target: str
    attention_target: str
    schedule: Schedule
    doc: dict[str, Any]


def _manifest_sha256(root: Path) -> str:
    return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()


def save_offloaded(dense: CompiledModel, attention: CompiledModel, schedule: Schedule, report: dict[str, Any],
                   path: str | os.PathLike[str]) -> None:
    """Writes ``path``/{offload.json, dense/, attention/}; replaces a previous offloaded artifact
    as a whole, refuses any other non-empty directory."""
    dest = Path(os.path.abspath(path))
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not is_offload_artifact(dest))):
        raise ArtifactError(str(dest), "exists and is not an empty directory or an offloaded artifact; refusing to "
                                       "overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        save_artifact(dense, staging / DENSE_DIR)
        save_artifact(attention, staging / ATTENTION_DIR)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "prefill": PREFILL,
               "dense": {"dir": DENSE_DIR, "target": dense.target, "manifest_sha256": _manifest_sha256(staging / DENSE_DIR)},
               "attention": {"dir": ATTENTION_DIR, "target": attention.target,
                             "manifest_sha256": _manifest_sha256(staging / ATTENTION_DIR)},
               "transfer_bytes_per_token": report, "schedule": schedule.to_json()}
        (staging / OFFLOAD_MANIFEST).write_bytes(json.dumps(json.loads(canonical_json(doc)), indent=1, sort_keys=True)
                                                 .encode("ascii") + b"\n")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.old")
            os.rename(dest, old)
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_offload_manifest(path: str | os.PathLike[str]) -> OffloadManifest:
    """``offload.json`` checked: a regular file of bounded size, strict JSON, known format, and
    the two sub-artifact manifests it names are the ones present (same sha256)."""
    from ..artifact_files import open_file
    root = Path(path)
    where = str(root / OFFLOAD_MANIFEST)
    fd = open_file(root, OFFLOAD_MANIFEST)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_BYTES:
            raise ArtifactError(where, f"{size} bytes is over the {MAX_BYTES}-byte cap (refused unread)")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = strict_json(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(where, f"not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(where, f"not a {FORMAT} version {FORMAT_VERSION} manifest")
    targets = {}
    for side, expected in (("dense", DENSE_DIR), ("attention", ATTENTION_DIR)):
        entry = doc.get(side)
        if not isinstance(entry, dict) or entry.get("dir") != expected or not isinstance(entry.get("target"), str):
            raise ArtifactError(where, f"field {side!r} must be {{dir: {expected!r}, target, manifest_sha256}}")
        sub = root / expected
        if not (sub / MANIFEST).is_file() or _manifest_sha256(sub) != entry.get("manifest_sha256"):
            raise ArtifactError(str(sub / MANIFEST), f"missing, or not the {side} artifact {OFFLOAD_MANIFEST} was "
                                                     "written with (manifest sha256 differs)")
        targets[side] = entry["target"]
    schedule = Schedule.from_json(doc.get("schedule"), f"{where}: schedule")
    return OffloadManifest(targets["dense"], targets["attention"], schedule, doc)


def load_side(path: str | os.PathLike[str], side: str, trust_native_code: bool = False,
              threads: int | None = None) -> CompiledModel:
    """One sub-artifact (``dense`` or ``attention``), loaded and validated as any artifact."""
    cm = load_artifact(Path(path) / side, trust_native_code=trust_native_code, threads=threads)
    return cm
