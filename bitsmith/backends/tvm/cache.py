"""On-disk cache of compiled kernels, shared by every process of a user.

A compiled kernel is keyed by sha256 of (kernel definition text and kind, schedule name and
version, target JSON, TVM version): change any of them and the kernel is rebuilt. Each entry
is a shared library ``<key>.so`` and its sha256 in ``<key>.sha256``, each written to a temp
name and renamed, so concurrent compiles never see half a file. A lookup reads the library
once (regular file owned by this user, opened without following links), hashes those bytes
and returns them only when they match the recorded digest: a tampered, half-replaced,
digest-less (older bitsmith) or foreign entry is rebuilt, never loaded, and the bytes returned
are exactly the ones hashed (the caller loads and saves those, never re-reading the path).
Location: ``$BITSMITH_CACHE_DIR/tvm``, else ``~/.cache/bitsmith/tvm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tvm

from .kernel import KernelDef

Scheduler = Callable[[KernelDef, Any], Any]  # (kdef, tvm target) -> scheduled IRModule


def cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "bitsmith"
    return base / "tvm"


def target_json(target: Any) -> str:
    return json.dumps(target.export(), sort_keys=True, default=str)


def kernel_key(kdef: KernelDef, schedule_id: str, target: Any) -> str:
    text = "\n".join((kdef.kind, kdef.text(), schedule_id, target_json(target), tvm.__version__))
    return hashlib.sha256(text.encode()).hexdigest()


def read_own_file(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file owned by this user (not a link), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_entry(so: Path) -> bytes | None:
    """A cache entry's library bytes if they match its ``.sha256`` file, else None."""
    digest = read_own_file(so.with_suffix(".sha256"))
    data = read_own_file(so)
    if not data or digest is None or hashlib.sha256(data).hexdigest() != digest.decode("ascii", "replace").strip():
        return None
    return data


def write_entry(so: Path, data: bytes) -> None:
    """Writes ``data`` and its digest as one cache entry (each file via temp name + rename)."""
    for path, blob in ((so, data), (so.with_suffix(".sha256"), (hashlib.sha256(data).hexdigest() + "\n").encode())):
        fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@dataclass
class KernelCache:
    """Compiles through the disk cache; counts hits/misses, rejected entries and compile time."""

    directory: Path = field(default_factory=cache_dir)
    hits: int = 0
    misses: int = 0
    rejected: int = 0   # entries present but not loadable (digest missing or mismatched, foreign)
    compile_seconds: float = 0.0

    def library(self, kdef: KernelDef, scheduler: Scheduler, schedule_id: str, target: Any) -> tuple[str, bytes]:
        """(key, shared-library bytes) of the compiled kernel, compiling on a miss."""
        key = kernel_key(kdef, schedule_id, target)
        path = self.directory / f"{key}.so"
        data = read_entry(path)
        if data is not None:
            self.hits += 1
            return key, data
        if os.path.lexists(path):
            self.rejected += 1
        self.misses += 1
        t0 = time.perf_counter()
        scheduled = scheduler(kdef, target)
        lib = tvm.compile(scheduled, target=target)
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            tmp_path = Path(tmp) / f"{key}.so"
            lib.export_library(str(tmp_path))
            data = tmp_path.read_bytes()  # read once: these bytes are cached, loaded and saved
        write_entry(path, data)
        self.compile_seconds += time.perf_counter() - t0
        return key, data
