"""CUDA graphs through the CUDA driver API: capture a stream's kernel launches once, replay them with one call.

Why the driver and not TVM or torch: TVM 0.27's runtime has no stand-alone graph capture for
plain kernel libraries (its cuda-graph builtins belong to the Relax VM), and the runtime must
not need torch. TVM launches every kernel on the stream that tvm_ffi's stream context names
(``TVMFFIEnvGetStream``), so a stream of our own, set with ``tvm_ffi.use_raw_stream`` and put in
capture mode with ``cuStreamBeginCapture``, records the launches of a whole decode step as a
graph; ``cuGraphLaunch`` replays it: one host call per step instead of one per kernel.

Replay reuses the recorded kernel arguments: buffer addresses and shapes. The caller keeps
every buffer the step touches at a fixed address and changes only their contents (docs/tvm-
backend.md, "One launch per decode step"). Capture mode is "relaxed" so the first-use work a
runtime may do inside a launch (a module load is done before capture by a warm-up run) is not
refused. ``libcuda.so.1`` is found with ctypes; the function table is injectable so the host
logic is tested without a GPU.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

from ...errors import BitsmithError

CU_STREAM_NON_BLOCKING = 1
CU_STREAM_CAPTURE_MODE_RELAXED = 2
_DRIVER_NAMES = ("cuStreamCreate", "cuStreamDestroy_v2", "cuStreamSynchronize", "cuStreamBeginCapture_v2",
                 "cuStreamEndCapture", "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphExecDestroy",
                 "cuGraphDestroy", "cuGetErrorName")


class CudaGraphUnavailable(BitsmithError):
    """Capture cannot be used here; the message is the reason (callers fall back to per-kernel launches)."""


class DriverAPI:
    """The few libcuda entry points a graph needs; ``lib`` (anything with those attributes) is for tests."""

    def __init__(self, lib: Any = None) -> None:
        if lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise CudaGraphUnavailable(f"the CUDA driver library libcuda.so.1 cannot be loaded: {e}") from None
        missing = [n for n in _DRIVER_NAMES if not hasattr(lib, n)]
        if missing:
            raise CudaGraphUnavailable(f"the CUDA driver lacks {missing} (driver older than CUDA 11.4?)")
        self.lib = lib

    def call(self, name: str, *args: Any) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise CudaGraphUnavailable(f"{name} failed: {self.error_name(rc)}")

    def error_name(self, rc: int) -> str:
        s = ctypes.c_char_p()
        try:
            self.lib.cuGetErrorName(int(rc), ctypes.byref(s))
        except Exception:  # noqa: BLE001 - a name is only decoration on the error
            return f"CUresult {rc}"
        return f"{s.value.decode() if s.value else 'CUresult'} ({rc})"


class StreamGraph:
    """One stream of our own and, once ``capture`` succeeded, the graph of one call of ``step``.

    ``run(step)`` launches ``step`` kernel by kernel on the stream (warm-up and fallback);
    ``capture(step)`` records it; ``replay()`` launches the recorded graph; ``synchronize()``
    waits. ``use_stream`` is ``tvm_ffi.use_raw_stream`` (injectable for tests)."""

    def __init__(self, device: Any, driver: DriverAPI | None = None,
                 use_stream: Callable[[Any, int], Any] | None = None) -> None:
        self.driver = driver or DriverAPI()
        if use_stream is None:
            import tvm_ffi
            use_stream = tvm_ffi.use_raw_stream
        self.device, self._use_stream = device, use_stream
        handle = ctypes.c_void_p()
        self.driver.call("cuStreamCreate", ctypes.byref(handle), CU_STREAM_NON_BLOCKING)
        self.stream = handle.value or 0
        self._graph: int | None = None
        self._exec: int | None = None

    @property
    def captured(self) -> bool:
        return self._exec is not None

    def run(self, step: Callable[[], None]) -> None:
        with self._use_stream(self.device, self.stream):
            step()

    def capture(self, step: Callable[[], None]) -> None:
        """Records ``step``'s launches; CudaGraphUnavailable (capture ended, nothing kept) if any
        part fails, e.g. a kernel launch the driver refuses to capture."""
        self.synchronize()
        self.driver.call("cuStreamBeginCapture_v2", ctypes.c_void_p(self.stream), CU_STREAM_CAPTURE_MODE_RELAXED)
        graph = ctypes.c_void_p()
        try:
            self.run(step)
        except Exception as e:
            self.driver.lib.cuStreamEndCapture(ctypes.c_void_p(self.stream), ctypes.byref(graph))
            if graph.value:
                self.driver.lib.cuGraphDestroy(graph)
            raise CudaGraphUnavailable(f"a launch failed while capturing the step: {type(e).__name__}: "
                                       f"{str(e)[:300]}") from e
        self.driver.call("cuStreamEndCapture", ctypes.c_void_p(self.stream), ctypes.byref(graph))
        if not graph.value:
            raise CudaGraphUnavailable("cuStreamEndCapture returned no graph (capture was invalidated)")
        exe = ctypes.c_void_p()
        try:
            self.driver.call("cuGraphInstantiateWithFlags", ctypes.byref(exe), graph, ctypes.c_ulonglong(0))
        except CudaGraphUnavailable:
            self.driver.lib.cuGraphDestroy(graph)
            raise
        self._graph, self._exec = graph.value, exe.value

    def replay(self) -> None:
        if self._exec is None:
            raise BitsmithError("StreamGraph.replay before a successful capture")
        self.driver.call("cuGraphLaunch", ctypes.c_void_p(self._exec), ctypes.c_void_p(self.stream))

    def synchronize(self) -> None:
        self.driver.call("cuStreamSynchronize", ctypes.c_void_p(self.stream))

    def close(self) -> None:
        if self._exec is not None:
            self.driver.lib.cuGraphExecDestroy(ctypes.c_void_p(self._exec))
            self.driver.lib.cuGraphDestroy(ctypes.c_void_p(self._graph))
            self._exec = self._graph = None
        if self.stream:
            self.driver.lib.cuStreamDestroy_v2(ctypes.c_void_p(self.stream))
            self.stream = 0

    def __del__(self) -> None:  # graphs and streams are driver objects: give them back
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
