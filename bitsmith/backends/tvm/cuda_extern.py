"""Kernels whose body is CUDA C the backend wrote itself, launched through TVM.

TVM still makes the launch code (host function, argument checks, grid from the dynamic row
count) from a small PrimFunc: thread-extent attributes and one ``call_extern`` of a
``__device__`` function. The function's text is inserted into the generated source by TVM's
``tvm_callback_cuda_postproc`` hook (called on every CUDA source TVM generates, before it is
stored or compiled), right before the first kernel, so the stored ``.cu``, the nvcc PTX and
the fatbin all hold it. The hook is registered once and only adds sources of functions the
code calls (names carry a digest of their text, so equal names mean equal text).
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any, Sequence

from tvm import te, tirx

SOURCES: dict[str, str] = {}  # device function name -> CUDA C text defining it
_LOCK = threading.Lock()
_INSTALLED = False
_KERNEL_START = 'extern "C" __global__'


def device_name(stem: str, source_of: Any) -> str:
    """A unique C name for a device function: ``stem`` + digest of what determines its text."""
    digest = hashlib.sha256(repr(source_of).encode()).hexdigest()[:12]
    return re.sub(r"\W", "_", f"bitsmith_{stem}_{digest}")


def register_source(name: str, source: str) -> None:
    with _LOCK:
        SOURCES[name] = source
    install_postproc()


def _insert_sources(code: str, *rest: Any) -> str:
    used = [name for name in SOURCES if f"{name}(" in code and f"void {name}(" not in code]
    if not used:
        return code
    at = code.find(_KERNEL_START)
    at = len(code) if at < 0 else at
    return code[:at] + "".join(SOURCES[n] for n in sorted(used)) + "\n" + code[at:]


def install_postproc() -> None:
    global _INSTALLED
    if _INSTALLED:
        return
    import tvm_ffi
    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", _insert_sources, override=True)
    _INSTALLED = True


def extern_kernel(func: tirx.PrimFunc, device_fn: str, grid: Sequence[Any], threads: int) -> tirx.PrimFunc:
    """A PrimFunc with ``func``'s parameters whose kernel calls ``device_fn(p0, ..., pn, m)`` (the
    buffers' data pointers in order, then the leading dim of the first one) on ``grid``
    (blockIdx.x, blockIdx.y extents, expressions of that dim) x ``threads``."""
    bufs = list(func.params)
    rows = bufs[0].shape[0]
    call = tirx.Evaluate(tirx.call_extern("void", device_fn, *[b.data for b in bufs], rows))
    body = tirx.AttrStmt(te.thread_axis("threadIdx.x"), "thread_extent", threads, call)
    for axis, extent in zip(("blockIdx.y", "blockIdx.x"), reversed(list(grid))):
        body = tirx.AttrStmt(te.thread_axis(axis), "thread_extent", extent, body)
    return tirx.PrimFunc(bufs, body).with_attr("tirx.is_scheduled", True)
