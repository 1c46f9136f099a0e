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
import threading
from typing import Any, Callable

import tvm

from .. import native_loader

_applied = threading.local()  # .threads: the size last applied to this thread's TVM pool


def cores() -> int:
    """CPUs this process may run on (TVM's own default counts physical cores only)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# counted once at import: TVM's pool pins the calling thread to one CPU when it starts, after
# which this process's affinity would report 1
USABLE_CPUS = cores()


def _lift_cap(n: int) -> None:
    """TVM never sizes a pool above its MaxConcurrency: ``TVM_NUM_THREADS``, read at each
    resize, else half the hardware threads on x86 (its guess at physical cores), so on 2 vCPUs
    ``threads=2`` (or the default 0, "every CPU") would silently run 1. The count (at most the
    CPUs this process may use) raises that cap; it is never lowered."""
    want = min(n, USABLE_CPUS)
    current = os.environ.get("TVM_NUM_THREADS", "")
    if want > 1 and (not current.isdigit() or int(current) < want):
        os.environ["TVM_NUM_THREADS"] = str(want)


_USER_CAP = os.environ.get("TVM_NUM_THREADS", "")  # a user's own cap, honoured by threads=0


def set_threads(threads: int) -> None:
    """Resizes TVM's pool to ``threads`` (0 = every CPU this process may use, or the user's own
    ``TVM_NUM_THREADS`` when it was set before bitsmith loaded)."""
    n = threads or (int(_USER_CAP) if _USER_CAP.isdigit() and int(_USER_CAP) > 0 else USABLE_CPUS)
    if getattr(_applied, "threads", None) == n:
        return
    # the cap as high as this process may ever ask: TVM fixes a pool's worker count when it first
    # builds it, so a pool first sized for 1 thread would run a later threads=2 model on 1, silently
    _lift_cap(max(n, USABLE_CPUS))
    tvm.get_global_func("runtime.config_threadpool")(0, int(n))
    _applied.threads = n


def num_threads() -> int:
    return int(tvm.get_global_func("runtime.NumThreads")())


def host_cpu() -> str:
    return str(tvm.target.codegen.llvm_get_system_cpu())


def load_module(data: bytes, name: str) -> Any:
    """A TVM runtime module from library bytes, through the hardened ``native_loader``."""
    return native_loader.load(data, name, lambda path: tvm.runtime.load_module(path))


class LibraryDir:
    """Kernel libraries loaded from bytes (``native_loader``), kept alive together."""

    def __init__(self) -> None:
        self._modules: list[Any] = []

    def load(self, key: str, data: bytes) -> Callable:
        mod = load_module(data, f"kernels/{key}.so")
        self._modules.append(mod)  # keep the module (and its dlopen handle) alive
        return mod["main"]
