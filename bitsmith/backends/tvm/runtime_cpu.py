"""CPU runtime details: TVM's thread pool and loading kernel libraries.

TVM's CPU thread pool reads ``TVM_NUM_THREADS`` when it is first used; afterwards the
registered global ``runtime.config_threadpool(affinity_mode, nthreads)`` resizes it
(affinity 0 = no pinning; nthreads 0 = one per core). TVM keeps one pool per calling thread
(``ThreadPool::ThreadLocal()`` in its thread_pool.cc), and ``config_threadpool`` resizes the
calling thread's pool only, so the executor re-applies its own ``threads`` option whenever it
differs from the last one applied in the calling thread: threads calling one model at once
each run its kernels on their own pool, sized by the model's option.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import tvm

_applied = threading.local()  # .threads: the size last applied to this thread's TVM pool


def cores() -> int:
    """CPUs this process may run on (TVM's own default counts physical cores only)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int) -> None:
    """Resizes TVM's pool to ``threads`` (0 = every CPU this process may use)."""
    n = threads or cores()
    if getattr(_applied, "threads", None) == n:
        return
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))
    _applied.threads = n


def num_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


def host_cpu() -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def load_library(path: str | os.PathLike) -> Callable:
    return tvm.runtime.load_module(str(path))["main"]


class LibraryDir:
    """A private temp dir holding kernel libraries written from an artifact's bytes."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bitsmith-tvm-")
        self.path = Path(self._tmp.name)
        self._modules: list[Any] = []

    def load(self, key: str, data: bytes) -> Callable:
        p = self.path / f"{key}.so"
        p.write_bytes(data)
        mod = tvm.runtime.load_module(str(p))
        self._modules.append(mod)  # keep the module (and its dlopen handle) alive
        return mod["main"]
