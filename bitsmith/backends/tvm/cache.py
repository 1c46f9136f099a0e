"""On-disk cache of compiled kernels, shared by every process of a user.

A compiled kernel is keyed by sha256 of (kernel definition text and kind, schedule name and
version, target JSON, TVM version): change any of them and the kernel is rebuilt. Each entry
is one shared library ``<key>.so``, written to a temp name and renamed, so concurrent
compiles never see half a file. Location: ``$BITSMITH_CACHE_DIR/tvm``, else
``~/.cache/bitsmith/tvm``.
"""

from __future__ import annotations

import hashlib
import json
import os
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


@dataclass
class KernelCache:
    """Compiles through the disk cache; counts hits/misses and compile time."""

    directory: Path = field(default_factory=cache_dir)
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0

    def library(self, kdef: KernelDef, scheduler: Scheduler, schedule_id: str, target: Any) -> tuple[str, bytes]:
        """(key, shared-library bytes) of the compiled kernel, compiling on a miss."""
        key = kernel_key(kdef, schedule_id, target)
        path = self.directory / f"{key}.so"
        if path.is_file():
            try:
                data = path.read_bytes()
                if data:
                    self.hits += 1
                    return key, data
            except OSError:
                pass
        self.misses += 1
        t0 = time.perf_counter()
        scheduled = scheduler(kdef, target)
        lib = tvm.compile(scheduled, target=target)
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            tmp_path = Path(tmp) / f"{key}.so"
            lib.export_library(str(tmp_path))
            data = tmp_path.read_bytes()
            os.replace(tmp_path, path)
        self.compile_seconds += time.perf_counter() - t0
        return key, data
