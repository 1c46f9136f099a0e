"""Runs a FunctionPlan: the per-call loop evaluates shapes, allocates and calls kernels.

Everything that can be decided once is decided in ``__init__``: symbol binding recipes,
per-dim polynomials, a flat tuple per step. Compiled llvm kernels take numpy arrays
directly, but they assume 64-byte aligned, C-contiguous data (misaligned data crashes
vectorised code), so every array handed to a kernel is allocated aligned here; views
(reshapes) of them stay aligned. Intermediate arrays that never reach the caller are
reused across calls when their shape repeats (decode steps).

Thread safety: an executor may run in several threads at once (a server's workers share one
loaded model). The reused intermediates live in a pool per calling thread
(``threading.local``), so concurrent calls never share a buffer while a thread's consecutive
calls still reuse its own. Cost, measured on single-threaded SmolLM2 decode (tvm-llvm
artifact, 32 tokens x 8 interleaved rounds, one process, 2 busy cores): per-thread pool 13.70
tok/s vs 13.74 for the former shared pool (0.997x, within noise); per-call buffers
(allocate every intermediate each call) 13.29 (0.967x). A lock would cost as little alone
but serialise a server's workers. Memory: one set of
intermediates per thread that has called the executor, freed when that thread ends. The
kernels themselves hold no state between calls; outputs that reach the caller are fresh
arrays in every call, as before.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError
from .binder import ExecutionError, PlanBinder, check_kernels, check_token_ids
from .plan import Call, FunctionPlan

__all__ = ["ExecutionError", "PlanExecutor", "aligned_copy", "aligned_empty", "kernel_view"]

ALIGN = 64
_CALL, _VIEW = 0, 1


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = 1
    for d in shape:
        n *= d
    nbytes = n * dtype.itemsize
    buf = np.empty(nbytes + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    if n == 0:  # numpy gives empty arrays odd strides, which TVM rejects as non-compact
        strides, acc = [], dtype.itemsize
        for d in reversed(shape):
            strides.append(acc)
            acc *= d
        return np.ndarray(shape, dtype, buf, off, tuple(reversed(strides)))
    return buf[off:off + nbytes].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    if a.flags.c_contiguous and a.ctypes.data % ALIGN == 0 and a.size:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def kernel_view(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(array a kernel accepts, object to keep alive): aligned, and writable in flags only.

    DLPack as tvm_ffi speaks it cannot mark a tensor read-only, so it refuses read-only
    numpy arrays (the module's constants). Kernels never write their inputs, so a writable
    alias of the same memory is passed instead of a copy of every weight.
    """
    a = aligned_copy(np.asarray(a))
    if a.flags.writeable:
        return a, a
    raw = (ctypes.c_byte * max(a.nbytes, 1)).from_address(a.ctypes.data)
    return np.frombuffer(raw, dtype=a.dtype, count=a.size).reshape(a.shape), a


class _ThreadBuffers(threading.local):
    """The calling thread's reusable intermediates, slot -> array (see the module docstring).

    A per-thread pool rather than per-call buffers (which would allocate every intermediate on
    every decode step) or a lock (which would serialise a server's workers); reaching it costs
    one thread-local attribute lookup per call."""

    def __init__(self) -> None:
        self.pool: dict[int, np.ndarray] = {}


class PlanExecutor:
    """``file`` is the artifact path of the plan (errors name it): a kernel that refuses the arrays
    the plan hands it (TVM checks every argument's rank, shape and dtype against the kernel it
    compiled) means the plan and the kernels disagree, which only a damaged artifact can cause
    once the caller's inputs have passed the binder's checks: ArtifactError, not ValueError."""

    def __init__(self, plan: FunctionPlan, kernels: Mapping[str, Callable], consts: Mapping[int, np.ndarray],
                 file: str = "plan.json", shared: "PlanExecutor | None" = None) -> None:
        """``shared``: an executor of a plan with the same constant slots (a variant of it, more
        slots allowed), whose constants this one reuses instead of ``consts``."""
        self.plan, self.file = plan, file
        self.base_env: list[Any] = [None] * plan.num_slots
        self._keep_alive = []
        if shared is not None:
            self.base_env[:len(shared.base_env)] = shared.base_env
            self._keep_alive.append(shared)
        for slot, arr in consts.items():
            self.base_env[slot], owner = kernel_view(arr)
            self._keep_alive.append(owner)
        self.binder = PlanBinder(plan)
        check_kernels(plan, kernels)
        self._steps: list[tuple] = []
        for s in plan.steps:
            if isinstance(s, Call):
                outs = tuple((slot, shp, np.dtype(dt), slot in self.binder.escaping) for slot, shp, dt in s.outputs)
                self._steps.append((_CALL, kernels[s.kernel], tuple(s.inputs), outs, s.check_ids))
            else:
                self._steps.append((_VIEW, s.src, s.dst, s.shape))
        self._buffers = _ThreadBuffers()

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        plan = self.plan
        arrays = [aligned_copy(a if a.flags.writeable else a.copy()) for a in self.binder.arrays(args)]
        shapes = self.binder.shapes(arrays)
        env = list(self.base_env)
        for slot, a in zip(plan.params, arrays):
            env[slot] = a
        try:
            return self._run_steps(env, shapes)
        except (ValueError, TypeError, IndexError) as e:
            if isinstance(e, BitsmithError) and not isinstance(e, ValueError):
                raise
            raise ArtifactError(self.file, f"functions[{plan.name!r}]: a kernel refused the arrays the plan "
                                           f"gives it (the plan does not match its kernels): "
                                           f"{type(e).__name__}: {str(e)[:300]}") from None

    def _run_steps(self, env: list[Any], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        plan = self.plan
        pool = self._buffers.pool
        for step in self._steps:
            if step[0] == _CALL:
                _, fn, ins, outs, check = step
                if check is not None:
                    check_token_ids(env[check[0]], check[1])
                out_arrays = []
                for slot, shp, dt, escapes in outs:
                    shape = shapes[shp]
                    a = None if escapes else pool.get(slot)
                    if a is None or a.shape != shape:
                        a = aligned_empty(shape, dt)
                        if not escapes:
                            pool[slot] = a
                    env[slot] = a
                    out_arrays.append(a)
                fn(*[env[i] for i in ins], *out_arrays)
            else:
                _, src, dst, shp = step
                env[dst] = env[src].reshape(shapes[shp])
        return [env[r] for r in plan.results]

