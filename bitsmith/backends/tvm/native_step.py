"""The native step driver: one C call runs a whole tvm-llvm plan (every kernel of a decode step).

``executor.PlanExecutor`` calls each kernel from Python (~450 calls per SmolLM2 decode token,
each converting its numpy arguments to DLPack: ~2.6 ms per token). ``NativePlanExecutor``
keeps the same plan, kernels, constants and thread-safety story, and hands the whole step list
to ``native/stepdrv.c``, which calls the same kernel Function objects through tvm-ffi's C ABI
and extern steps (the LUT engine) through their C entry points. Per run, Python only binds the
arguments (the binder's checks), evaluates the plan's shapes once into a shape table, grows
buffers whose shape grew, and allocates the arrays that reach the caller.

The driver is generic C (it knows no model): it is compiled at compile time (gcc, baseline
x86-64, so any x86-64 CPU runs it), its bytes go into the artifact (``driver/stepdrv.so``,
its instruction set recorded in plan.json under ``driver_isa``) and load through
``native_loader`` like every kernel library, i.e. only when trusted. Without a C compiler at
compile time, or from an artifact that has no driver, the Python executor runs.

Results equal the Python executor's bit for bit: the same kernels run on the same inputs in
the same order; the driver only forwards pointers (tests/test_native_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import replace
from importlib import resources
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError
from .. import native_loader
from .binder import PlanBinder
from .executor import ALIGN, PlanExecutor, aligned_copy, aligned_empty
from .plan import EXTERN_PREFIX, Call, View

SOURCE = "stepdrv.c"
DRIVER_FILE = "driver/stepdrv.so"
DRIVER_ABI = 1
CFLAGS = ("-O2", "-march=x86-64", "-mtune=generic", "-fPIC", "-shared", "-fno-strict-aliasing")
SPEC = native_loader.NativeSpec("tvm-step-driver", "x86_64", "x86-64", ("sse", "sse2"))
OP_KERNEL, OP_VIEW, OP_CHECK, OP_EXTERN = 0, 1, 2, 3
ERR_KERNEL, ERR_IDS, ERR_MEMORY, ERR_ARGS = 1, 2, 5, 6

# DLTensor (dlpack.h) as a numpy record: data, device, ndim, dtype, shape, strides, byte_offset
DLTENSOR = np.dtype([("data", np.uint64), ("device_type", np.int32), ("device_id", np.int32),
                     ("ndim", np.int32), ("code", np.uint8), ("bits", np.uint8), ("lanes", np.uint16),
                     ("shape", np.uint64), ("strides", np.uint64), ("byte_offset", np.uint64)])
assert DLTENSOR.itemsize == 48
KDL_CPU = 1
_DL_CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # numpy kind -> DLDataTypeCode (kDLBool = 6)

# extern_layer_t of stepdrv.c: lut_exec and its bound operands
EXTERN_LAYER = np.dtype([("fn", np.uint64), ("stream", np.uint64), ("pos", np.uint64), ("ntables", np.int64),
                         ("nsegs", np.int64), ("W", np.uint64), ("P", np.uint64), ("O", np.uint64),
                         ("n", np.int64), ("k", np.int64), ("kpad", np.int64), ("macs_per_row", np.int64),
                         ("auto_single_below", np.int64), ("kind", np.int64), ("threads", np.int64),
                         ("launcher", np.uint64)])


class NativeExtern:
    """An extern step the driver can run in C: ``record`` is one EXTERN_LAYER row (the LUT
    engine's ``lut_exec`` and its operands), ``owners`` the arrays its pointers point into.
    Calling it from Python runs ``fallback`` (the Python executor's path)."""

    def __init__(self, record: np.ndarray, owners: Sequence[Any], fallback: Callable[..., None]) -> None:
        self.record, self.owners, self.fallback = record, tuple(owners), fallback

    def __call__(self, *args: np.ndarray) -> None:
        self.fallback(*args)


class DriverBuildError(BitsmithError):
    """The step driver could not be compiled (no C compiler or no tvm-ffi headers)."""


def source_text() -> bytes:
    return resources.files(__package__).joinpath("native", SOURCE).read_bytes()


def build_driver() -> bytes | None:
    """The driver's bytes (compiled once per process and granted as built here), or None when
    this machine cannot build it (no gcc): the plans then run on the Python executor."""
    try:
        data = _compile(source_text())
    except DriverBuildError:
        return None
    native_loader.grant_built(data, SPEC)
    return data


@functools.lru_cache(maxsize=2)
def _compile(source: bytes) -> bytes:
    import tvm_ffi.libinfo as info
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None or native_loader.host_arch() != SPEC.arch:
        raise DriverBuildError("no gcc for x86_64")
    includes = [f"-I{p}" for p in (info.find_include_path(), info.find_dlpack_include_path())]
    with tempfile.TemporaryDirectory(prefix="bitsmith-stepdrv-") as d:
        with open(os.path.join(d, SOURCE), "wb") as f:
            f.write(source)
        # relative names, the temp dir mapped away: the bytes do not depend on where we built
        proc = subprocess.run([cc, *CFLAGS, f"-ffile-prefix-map={d}=.", *includes, SOURCE, "-o", "stepdrv.so"],
                              capture_output=True, text=True, cwd=d)
        if proc.returncode:
            raise DriverBuildError(f"building the step driver failed:\n{proc.stderr[-2000:]}")
        with open(os.path.join(d, "stepdrv.so"), "rb") as f:
            return f.read()


class Driver:
    """The loaded driver library (through ``native_loader``: granted bytes only) and the tvm-ffi
    C functions it calls kernels through."""

    def __init__(self, library: bytes, name: str = DRIVER_FILE) -> None:
        import tvm_ffi.libinfo as info
        self.library = library
        self._lib = native_loader.load(library, name, ctypes.CDLL)
        abi = int(self._lib.bs_driver_abi())
        if abi != DRIVER_ABI:
            raise ArtifactError(name, f"step driver speaks ABI {abi}, this runtime {DRIVER_ABI}")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self.run = self._lib.bs_run
        self.run.argtypes = [p, i64, p, i64, p, i64, p, i64, p]
        self.run.restype = i64
        ffi = ctypes.CDLL(info.find_libtvm_ffi())  # already loaded by tvm_ffi: the same library
        addr = [ctypes.cast(getattr(ffi, n), ctypes.c_void_p).value
                for n in ("TVMFFIFunctionCall", "TVMFFIErrorMoveFromRaised", "TVMFFIObjectDecRef")]
        self.api = np.array(addr, dtype=np.uint64)
        self.api_ptr = self.api.ctypes.data


def _aligned_all(arrays: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Each array as a kernel can take it (writable, C-contiguous, 64-byte aligned, not empty:
    ``executor.aligned_copy``'s rule; else an aligned copy) and its data pointer, read once
    through ``__array_interface__`` (cheaper than a ctypes object per array)."""
    out, pointers = [], []
    for a in arrays:
        ptr = a.__array_interface__["data"][0]
        if not (a.flags.writeable and a.flags.c_contiguous and a.size and ptr % ALIGN == 0):
            a = aligned_copy(a if a.flags.writeable else a.copy())
            ptr = a.__array_interface__["data"][0]
        out.append(a)
        pointers.append(ptr)
    return out, pointers


def _dl_dtype(dt: np.dtype) -> tuple[int, int]:
    if dt.kind not in _DL_CODES:
        raise BitsmithError(f"step driver: no DLPack type for {dt}")
    return _DL_CODES[dt.kind], dt.itemsize * 8


def _function_handle(fn: Any) -> int | None:
    """The tvm-ffi object handle of a kernel Function (what TVMFFIFunctionCall takes)."""
    handle = getattr(fn, "__chandle__", None)
    return int(handle()) if handle is not None else None


class _ThreadState(threading.local):
    """The calling thread's tensor table, shape table and intermediate buffers (as the Python
    executor keeps a buffer pool per thread: concurrent runs never share a buffer)."""

    def __init__(self) -> None:
        self.ready = False


class NativePlanExecutor:
    """Runs a plan through the driver; ``python`` is the PlanExecutor of the same plan (used for
    error reports and by ``run_python``). Interface of PlanExecutor: ``run(args)``."""

    def __init__(self, python: PlanExecutor, kernels: Mapping[str, Any], driver: Driver) -> None:
        self.python, self.driver = python, driver
        plan = self.plan = python.plan
        self.file = python.file
        # one binder over the plan's shapes and then every parameter's dims: one evaluation a run
        self.binder = PlanBinder(replace(plan, shapes=list(plan.shapes) + [list(d) for d, _ in plan.param_types]))
        self.nshapes = len(self.binder.plan.shapes)
        self.rank = max([len(s) for s in self.binder.plan.shapes] + [1])
        keys: dict[str, int] = {}
        handles: list[int] = []
        externs: list[np.ndarray] = []
        self._owners: list[Any] = []
        extern_index: dict[str, int] = {}
        words: list[int] = []
        slot_shape: dict[int, int] = {}
        slot_dtype: dict[int, np.dtype] = {}
        for k, (slot, (_, dt)) in enumerate(zip(plan.params, plan.param_types)):
            slot_shape[slot] = len(plan.shapes) + k
            slot_dtype[slot] = self.binder.param_dtypes[k]
        const_dtype = {slot: a.dtype for slot, a in enumerate(python.base_env) if a is not None}
        self.produced: list[tuple[int, int, np.dtype]] = []  # (slot, shape id, dtype) of call outputs
        views: list[tuple[int, int, int | None]] = []  # (source slot, view shape id, source shape id)
        for s in plan.steps:
            if isinstance(s, Call):
                if s.check_ids is not None:
                    words += [OP_CHECK, s.check_ids[0], s.check_ids[1]]
                for slot, shp, dt in s.outputs:
                    slot_shape[slot], slot_dtype[slot] = shp, np.dtype(dt)
                    self.produced.append((slot, shp, np.dtype(dt)))
                fn = kernels[s.kernel]
                if s.kernel.startswith(EXTERN_PREFIX):
                    if not isinstance(fn, NativeExtern):
                        raise BitsmithError(f"extern step {s.kernel} has no native entry point")
                    if s.kernel not in extern_index:
                        extern_index[s.kernel] = len(externs)
                        externs.append(fn.record)
                        self._owners.append(fn.owners)
                    if len(s.inputs) not in (1, 2) or len(s.outputs) != 1:
                        raise BitsmithError(f"extern step {s.kernel}: expected (x, [bias], out)")
                    words += [OP_EXTERN, extern_index[s.kernel], len(s.inputs) - 1, *s.inputs, s.outputs[0][0]]
                    continue
                if s.kernel not in keys:
                    h = _function_handle(fn)
                    if h is None:
                        raise BitsmithError(f"kernel {s.kernel} is not a tvm-ffi Function")
                    keys[s.kernel] = len(handles)
                    handles.append(h)
                    self._owners.append(fn)
                args = list(s.inputs) + [o[0] for o in s.outputs]
                words += [OP_KERNEL, keys[s.kernel], len(args), *args]
            else:
                words += [OP_VIEW, s.src, s.dst]
                views.append((s.src, s.shape, slot_shape.get(s.src)))
                slot_shape[s.dst] = s.shape
                slot_dtype[s.dst] = slot_dtype.get(s.src, const_dtype.get(s.src))  # a view of a constant too
        self.program = np.array(words, dtype=np.int64)
        # a view only forwards the data pointer (stepdrv.c): its element count must equal its
        # source's, checked per run (shapes with symbols) as numpy's reshape does on the Python path
        self.view_shape = np.array([v for _, v, src in views if src is not None], np.int64)
        self.view_src_shape = np.array([src for _, _, src in views if src is not None], np.int64)
        const_views = [(v, slot) for slot, v, src in views if src is None]
        for _, slot in const_views:
            if const_dtype.get(slot) is None:
                raise ArtifactError(python.file, f"functions[{plan.name!r}]: a view of slot {slot}, "
                                                 "which no parameter, constant or step defines")
        self.const_view_shape = np.array([v for v, _ in const_views], np.int64)
        self.const_view_size = np.array([python.base_env[slot].size for _, slot in const_views], np.int64)
        self.handles = np.array(handles or [0], dtype=np.uint64)
        self.externs = np.array(externs, dtype=EXTERN_LAYER) if externs else np.zeros(1, EXTERN_LAYER)
        self.kernel_calls = sum(1 for s in plan.steps if isinstance(s, Call))
        self.slot_shape, self.slot_dtype = slot_shape, slot_dtype
        self.escaping = python.binder.escaping
        self._results_views = self._result_recipes()
        out_calls = [(slot, shp, dt) for slot, shp, dt in self.produced if slot in self.escaping]
        self.out_slot_list = [slot for slot, _, _ in out_calls]
        self.out_slots = np.array(self.out_slot_list, np.int64)
        self.out_shape = np.array([shp for _, shp, _ in out_calls], np.int64)
        self.out_size = np.array([dt.itemsize for _, _, dt in out_calls], np.int64)
        self.out_dtypes = [dt for _, _, dt in out_calls]
        self.param_slots = np.array(plan.params, np.int64)
        self.param_index = {slot: k for k, slot in enumerate(plan.params)}
        self.program_ptr, self.handles_ptr = self.program.ctypes.data, self.handles.ctypes.data
        self.externs_ptr = self.externs.ctypes.data
        self._state = _ThreadState()

    def _result_recipes(self) -> list[tuple[int, int]]:
        """Per result: (slot holding its data, shape id); a result that is a view reads its source."""
        src: dict[int, int] = {}
        for s in self.plan.steps:
            if isinstance(s, View):
                src[s.dst] = src.get(s.src, s.src)
        return [(src.get(r, r), self.slot_shape.get(r, -1)) for r in self.plan.results]

    # ------------------------------------------------------------------ per-thread setup

    def _setup(self, st: _ThreadState) -> None:
        plan = self.plan
        st.table = np.zeros(plan.num_slots, DLTENSOR)
        st.shapes = np.zeros((self.nshapes, self.rank), np.int64)
        st.const_shapes = []
        st.table["device_type"] = KDL_CPU
        st.table["lanes"] = 1
        for slot, arr in enumerate(self.python.base_env):
            if arr is None:
                continue
            shape = np.array(arr.shape or (1,), np.int64)
            st.const_shapes.append(shape)
            self._describe(st, slot, arr.ndim, arr.dtype, shape.ctypes.data)
            st.table["data"][slot] = arr.ctypes.data
        base = st.shapes.ctypes.data
        for slot, shp in self.slot_shape.items():
            dt = self.slot_dtype.get(slot)
            if dt is None:
                continue
            self._describe(st, slot, len(self.binder.plan.shapes[shp]), dt, base + 8 * self.rank * shp)
        # intermediates: one buffer per produced slot, grown when a run needs more bytes
        st.inter = [(slot, shp, dt) for slot, shp, dt in self.produced if slot not in self.escaping]
        st.inter_slots = np.array([s for s, _, _ in st.inter], np.int64)
        st.inter_shape = np.array([p for _, p, _ in st.inter], np.int64)
        st.inter_size = np.array([d.itemsize for _, _, d in st.inter], np.int64)
        st.capacity = np.full(len(st.inter), -1, np.int64)  # -1: no buffer yet (even 0 bytes get one)
        st.buffers = [None] * len(st.inter)
        st.table_ptr = st.table.ctypes.data
        st.ready = True

    @staticmethod
    def _describe(st: _ThreadState, slot: int, ndim: int, dt: np.dtype, shape_ptr: int) -> None:
        code, bits = _dl_dtype(np.dtype(dt))
        rec = st.table[slot]
        rec["ndim"], rec["code"], rec["bits"], rec["shape"] = ndim, code, bits, shape_ptr
        st.table[slot] = rec

    # ------------------------------------------------------------------ running

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        st = self._state
        if not st.ready:
            self._setup(st)
        plan = self.plan
        arrays, pointers = _aligned_all(self.python.binder.arrays(args))
        shapes = self.binder.shapes(arrays)
        rank = self.rank
        st.shapes[...] = [s + (1,) * (rank - len(s)) for s in shapes]  # padding 1s: products unchanged
        data = st.table["data"]
        data[self.param_slots] = pointers
        sizes = st.shapes.prod(axis=1)
        if not (np.array_equal(sizes[self.view_shape], sizes[self.view_src_shape])
                and np.array_equal(sizes[self.const_view_shape], self.const_view_size)):
            self._bad_view(sizes)
        # intermediates whose bytes grew (first run, or a dim such as ``past`` went up)
        need = sizes[st.inter_shape] * st.inter_size
        for i in np.flatnonzero(need > st.capacity):
            slot, shp, dt = st.inter[i]
            # a shape with a symbol (seq, past) may grow again: double, so growth costs O(log n) buffers
            cap = int(need[i]) * 2 if any(isinstance(d, str) for d in plan.shapes[shp]) else int(need[i])
            buf = aligned_empty((max(cap, ALIGN) // dt.itemsize,), dt)
            st.buffers[i], st.capacity[i] = buf, cap
            data[slot] = buf.__array_interface__["data"][0]
        # the arrays that reach the caller: carved from one fresh arena per run (64-byte aligned each)
        nbytes = (sizes[self.out_shape] * self.out_size + ALIGN - 1) // ALIGN * ALIGN
        offsets = np.concatenate([[0], np.cumsum(nbytes)[:-1]]) if len(nbytes) else nbytes
        arena = aligned_empty((max(int(nbytes.sum()), ALIGN),), np.dtype(np.uint8))
        data[self.out_slots] = arena.__array_interface__["data"][0] + offsets
        rc = self.driver.run(self.program_ptr, self.program.size, st.table_ptr, plan.num_slots, self.handles_ptr,
                             len(self.handles), self.externs_ptr, len(self.externs), self.driver.api_ptr)
        if rc:
            return self._failed(rc, args)
        outs = {slot: arena[o:o + n].view(dt) for slot, o, n, dt in
                zip(self.out_slot_list, offsets.tolist(), (sizes[self.out_shape] * self.out_size).tolist(),
                    self.out_dtypes)}
        results = []
        for src, shp in self._results_views:
            a = outs[src] if src in outs else arrays[self.param_index[src]]
            results.append(a.reshape(shapes[shp]) if shp >= 0 else a)
        return results

    def _bad_view(self, sizes: np.ndarray) -> None:
        """A view whose element count differs from its source's (a damaged plan: the next kernel
        would read or write past the buffer): the ArtifactError the Python executor raises when
        numpy's reshape refuses it."""
        got = np.concatenate([sizes[self.view_shape], sizes[self.const_view_shape]])
        want = np.concatenate([sizes[self.view_src_shape], self.const_view_size])
        i = int(np.flatnonzero(got != want)[0])
        raise ArtifactError(self.file, f"functions[{self.plan.name!r}]: a view of {int(want[i])} elements "
                                       f"has shape of {int(got[i])} elements (the plan does not match its kernels)")

    def _failed(self, rc: int, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """A kernel refused its arguments or a token id was out of range: the Python executor
        runs the same plan and raises the error it would have raised (ExecutionError,
        ArtifactError naming the plan file). When the driver only ran out of memory (the LUT
        input's padded copy), the Python executor's result is the run's result, not an error."""
        result = self.python.run(args)
        if rc & 0xFF == ERR_MEMORY:
            return result
        raise ArtifactError(self.file, f"functions[{self.plan.name!r}]: the step driver stopped at step "
                                       f"{rc >> 8} (code {rc & 0xFF}) where the Python executor did not")

    def run_python(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.python.run(args)
