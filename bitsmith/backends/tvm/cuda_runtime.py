"""tvm-cuda at run time: find the GPU, load kernel libraries, run a plan on device tensors.

Loading never compiles when the artifact carries nvcc-built fatbins: TVM's CUDA runtime
compiles a device module stored as source through the global ``tvm_callback_cuda_compile``
hook, and the hook installed here answers with the fatbin built for that exact source
(looked up by sha256). Only a source without a stored binary falls through to TVM's own
compiler (nvcc when ``TVM_CUDA_COMPILE_MODE=nvcc``, else NVRTC) with TVM's flags; that
happens only for artifacts compiled with ``nvcc="skip"`` (one compiled with the default
"required" must carry every fatbin, checked at load); ``BINARIES.misses`` counts those.

The executor mirrors ``executor.PlanExecutor`` (same plan, same step order, the same argument
binding: ``binder.PlanBinder``), but every slot holds a ``tvm.runtime.Tensor`` on the GPU: constants are uploaded once, inputs per
call, reshapes are views, and intermediates that do not escape are reused across calls of
the same shape.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from .. import native_loader
from .binder import PlanBinder, check_kernels, check_token_ids
from .cuda_scratch import ScratchSpec
from .plan import FunctionPlan, View

NO_GPU = "tvm-cuda needs a CUDA GPU; none found"
SCHEDULE_ID = "cuda-v2"  # part of the kernel cache key: bump when a CUDA schedule changes
GEMV_MAX_ROWS = 8  # "main_gemv" of a linear kernel serves m <= this
SMALL_MMA_MAX_ROWS = 32  # "main_small" (tensor cores, 16-row tiles) serves m <= this
ROW_LIMITS = {"main_gemv": GEMV_MAX_ROWS, "main_small": SMALL_MMA_MAX_ROWS}  # by function name
HOST_KIND = "tvm-cuda-host"  # NativeSpec kind of a kernel library (launch code + device module)


def host_spec(target: Any) -> native_loader.NativeSpec:
    """What the launch code of kernels built for a CUDA ``target`` needs of the CPU (its LLVM
    host: generic x86-64 unless the target says otherwise)."""
    return native_loader.llvm_spec(HOST_KIND, target.host)


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _load_cuda_runtime(tvm: Any) -> None:
    """TVM's runtime-only mode (TVM_USE_RUNTIME_LIB=1, how a deployment without the compiler
    runs) skips its backend autoload, so the CUDA device API and module loader
    (libtvm_runtime_cuda) would never register: load that library here."""
    from tvm.base import _LOADED_LIBS
    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, FileNotFoundError, RuntimeError):
        pass  # no CUDA runtime library here: gpu_available() answers False


def _tvm() -> Any:
    import tvm
    _load_cuda_runtime(tvm)
    return tvm


def gpu_available() -> bool:
    try:
        tvm = _tvm()
        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001 - a runtime without CUDA support raises on the query
        return False


def require_gpu() -> Any:
    if not gpu_available():
        raise BitsmithError(NO_GPU)
    return _tvm().cuda(0)


@dataclass
class BinaryStore:
    """Prebuilt device binaries by sha256 of the CUDA source they were built from."""

    binaries: dict[str, bytes] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    installed: bool = False

    def add(self, source_sha256: str, fatbin: bytes) -> None:
        self.binaries[source_sha256] = fatbin

    def install(self) -> None:
        """Registers the compile hook (idempotent) in front of TVM's own."""
        if self.installed:
            return
        import tvm_ffi
        try:  # TVM's own hook, kept as the fallback for sources without a stored binary
            from tvm.support import nvcc as tvm_nvcc
            fallback: Callable[[str], Any] | None = tvm_nvcc.tvm_callback_cuda_compile
        except Exception:  # noqa: BLE001 - a runtime-only install may lack the compiler helpers
            fallback = None
        store = self

        def compile_hook(code: str, *rest: Any) -> Any:  # some TVM builds also pass the target
            binary = store.binaries.get(source_digest(code))
            if binary is not None:
                store.hits += 1
                return bytearray(binary)
            store.misses += 1
            if fallback is None:
                raise BitsmithError("tvm-cuda: a kernel has no prebuilt binary and no CUDA compiler is available")
            return fallback(code, *rest)

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_hook, override=True)
        self.installed = True


BINARIES = BinaryStore()


class LinearDispatch:
    """Calls the first function whose row limit covers the row count (first dim of the first
    argument), else the general one ("main")."""

    def __init__(self, general: Callable, limited: Sequence[tuple[int, Callable]]) -> None:
        self.general, self.limited = general, sorted(limited, key=lambda p: p[0])

    def __call__(self, *args: Any) -> None:
        rows = args[0].shape[0]
        for limit, fn in self.limited:
            if rows <= limit:
                fn(*args)
                return
        self.general(*args)


class AttentionDispatch:
    """Calls "main_decode" (split-KV) when the query length (axis 2 of q, the first argument)
    is at most ``max_seq``, else "main" (tiled prefill); see ``attention_cuda``."""

    def __init__(self, general: Callable, decode: Callable, max_seq: int) -> None:
        self.general, self.decode, self.max_seq = general, decode, max_seq

    def __call__(self, *args: Any) -> None:
        fn = self.decode if args[0].shape[2] <= self.max_seq else self.general
        fn(*args)


def decode_max_seq(key: str, scratch: Sequence[ScratchSpec]) -> int:
    """The longest query the split-KV function may take: the cap its split buffers were sized
    with (a (param, axis, div, cap) dim of the scratch specs), so the two always agree."""
    caps = [d[3] for spec in scratch for d in spec.dims if isinstance(d, tuple) and len(d) == 4 and d[3] > 0]
    if not caps:
        raise BitsmithError(f"kernel {key} has a split-KV function but no capped scratch dim to bound its queries")
    return min(caps)


class KernelLibraries:
    """Kernel libraries loaded from bytes (``native_loader``) for the GPU, kept alive together."""

    def __init__(self) -> None:
        self._modules: list[Any] = []

    def load(self, key: str, library: bytes, functions: Sequence[str], max_rows: int,
             scratch: Sequence[ScratchSpec] = ()) -> Callable:
        tvm = _tvm()
        mod = native_loader.load(library, f"kernels/{key}.so", lambda path: tvm.runtime.load_module(path))
        self._modules.append(mod)
        if "main_decode" in functions:
            return AttentionDispatch(mod["main"], mod["main_decode"], decode_max_seq(key, scratch))
        limits = {**ROW_LIMITS, "main_gemv": max_rows}
        limited = [(limits[f], mod[f]) for f in functions if f in limits]
        return LinearDispatch(mod["main"], limited) if limited else mod["main"]


@dataclass(frozen=True)
class DeviceKernel:
    fn: Callable
    scratch: tuple[ScratchSpec, ...]


class CudaPlanExecutor:
    """Runs one FunctionPlan on the GPU (see the module docstring); arguments bind as on the
    CPU (``binder.PlanBinder``)."""

    def __init__(self, plan: FunctionPlan, kernels: Mapping[str, DeviceKernel],
                 consts: Mapping[int, np.ndarray], device: Any, keep_dtype: frozenset[int] = frozenset()) -> None:
        """``keep_dtype``: result indices handed back in their own dtype (the KV cache: fp16
        stays fp16 between steps); every other fp16 result comes back as float32."""
        tvm = _tvm()
        self.keep_dtype = keep_dtype
        self.tvm, self.plan, self.device, self.kernels = tvm, plan, device, kernels
        self.base_env: list[Any] = [None] * plan.num_slots
        for slot, arr in consts.items():
            self.base_env[slot] = tvm.runtime.tensor(np.require(arr, requirements="C"), device)  # keeps 0-d
        self.binder = PlanBinder(plan)
        check_kernels(plan, kernels)
        self._pool: dict[tuple[int, int], Any] = {}

    def _empty(self, key: tuple[int, int], shape: tuple[int, ...], dtype: str, reuse: bool,
               pool: dict[tuple[int, int], Any] | None = None) -> Any:
        pool = self._pool if pool is None else pool
        a = pool.get(key) if reuse else None
        if a is None or tuple(a.shape) != shape:
            a = self.tvm.runtime.empty(shape, dtype, self.device)
            if reuse:
                pool[key] = a
        return a

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        plan = self.plan
        host = [np.ascontiguousarray(a) for a in self.binder.arrays(args)]
        env = list(self.base_env)
        host_env: dict[int, np.ndarray] = {}
        for slot, a in zip(plan.params, host):
            env[slot] = self.tvm.runtime.tensor(a, self.device)
            host_env[slot] = a
        self._launch(env, self.binder.shapes(host), host_env, None)
        out = [env[r].numpy() for r in plan.results]
        return [a.astype(np.float32) if a.dtype == np.float16 and k not in self.keep_dtype else a
                for k, a in enumerate(out)]

    def run_static(self, inputs: Sequence[Any], pool: dict[tuple[int, int], Any],
                   host_ids: Mapping[int, np.ndarray] | None = None) -> list[Any]:
        """Runs on device tensors ``inputs`` (the plan's parameters) and returns the result
        tensors, left on the device. Every buffer, results included, comes from ``pool`` (the
        caller's own): calls with the same shapes touch the same addresses, which is what a
        captured CUDA graph replays. Token ids are checked only where ``host_ids`` (param index
        -> array) has them."""
        plan = self.plan
        if len(inputs) != len(plan.params):
            raise BitsmithError(f"function {plan.name!r} takes {len(plan.params)} inputs, got {len(inputs)}")
        env = list(self.base_env)
        host_env = {plan.params[k]: a for k, a in (host_ids or {}).items()}
        for slot, a in zip(plan.params, inputs):
            env[slot] = a
        self._launch(env, self.binder.shapes(inputs), host_env, pool)
        return [env[r] for r in plan.results]

    def _launch(self, env: list[Any], shapes: list[tuple[int, ...]], host_env: dict[int, np.ndarray],
                static_pool: dict[tuple[int, int], Any] | None) -> None:
        """Launches every step; with ``static_pool`` every output (results too) is pooled there."""
        static = static_pool is not None
        for n, step in enumerate(self.plan.steps):
            if isinstance(step, View):
                shape = shapes[step.shape]
                env[step.dst] = env[step.src]._create_view(shape)
                if step.src in host_env:
                    host_env[step.dst] = host_env[step.src].reshape(shape)
                continue
            if step.check_ids is not None:
                check_token_ids(host_env.get(step.check_ids[0]), step.check_ids[1])
            kernel = self.kernels[step.kernel]
            ins = [env[i] for i in step.inputs]
            scratch = [self._empty((n, -1 - k), spec.shape(ins), spec.dtype, True, static_pool)
                       for k, spec in enumerate(kernel.scratch)]
            outs = []
            for slot, shp, dt in step.outputs:
                a = self._empty((n, slot), shapes[shp], dt, static or slot not in self.binder.escaping, static_pool)
                env[slot] = a
                outs.append(a)
            kernel.fn(*ins, *scratch, *outs)
