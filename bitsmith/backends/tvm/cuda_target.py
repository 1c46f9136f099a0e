"""Target ``tvm-cuda``: fused TIR kernels scheduled for NVIDIA GPUs, built with nvcc.

Options: ``arch`` (default "sm_90", H100), ``act_dtype`` (default "float16": activations
and dense weights in fp16, see ``cuda_half``; "float32" keeps the module as is) and ``nvcc``
("required", the default: compiling fails with NvccMissingError where nvcc is not on PATH;
"skip": ship CUDA source only, which the GPU machine compiles at load with TVM's compiler and
TVM's flags; plan.json records which, and the nvcc flags used).

Building needs no GPU: kernels are lowered (``lowering``), scheduled (``schedule_cuda``),
compiled by TVM to CUDA C and by nvcc to a fatbin + PTX (``cuda_build``). The artifact
stores, per kernel, ``kernels/<key>.so`` (launch code + device module), ``.cu`` (source),
``.ptx`` and ``.fatbin`` (nvcc), and one ``plan.json``
with the plans and kernel metadata. ``run()`` needs a GPU (``cuda_runtime``); without one
it raises BitsmithError("tvm-cuda needs a CUDA GPU; none found"), while ``files()`` and
saving work anywhere.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from ...ir import Module
from ..base import Executable
from .cuda_half import convert_activations
from .cuda_runtime import (BINARIES, SCHEDULE_ID, CudaPlanExecutor, DeviceKernel, KernelLibraries, require_gpu,
                           source_digest)
from .cuda_scratch import ScratchSpec
from .plan import PLAN_FORMAT, FunctionPlan, PlanError, read_plan_doc
from .schedule_cuda import DEFAULT_ARCH, DEFAULT_GEMV, check_arch
from .targets import TargetSpec, register_target

if TYPE_CHECKING:
    from .cuda_build import CudaKernel

TARGET = "tvm-cuda"
ACT_DTYPES = ("float16", "float32")
NVCC_MODES = ("required", "skip")
# what compiles a kernel shipped without a fatbin (nvcc="skip"), recorded in plan.json
RUNTIME_COMPILER = ("TVM's tvm_callback_cuda_compile at load on the GPU machine: NVRTC with TVM's flags "
                    "(--gpu-architecture of the device, -default-device, --use_fast_math), or nvcc with TVM's "
                    "flags when TVM_CUDA_COMPILE_MODE=nvcc")


def option_defaults() -> dict[str, Any]:
    return {"arch": DEFAULT_ARCH, "act_dtype": "float16", "nvcc": "required"}


def _options(options: Mapping[str, Any]) -> tuple[str, str]:
    arch = options.get("arch", DEFAULT_ARCH)
    act = options.get("act_dtype", "float16")
    if act not in ACT_DTYPES:
        raise BitsmithError(f"tvm-cuda option act_dtype must be one of {ACT_DTYPES}, got {act!r}")
    return check_arch(arch), act


def nvcc_mode(options: Mapping[str, Any]) -> str:
    mode = options.get("nvcc", "required")
    if mode not in NVCC_MODES:
        raise BitsmithError(f"tvm-cuda option nvcc must be one of {NVCC_MODES}, got {mode!r}")
    return mode


def nvcc_record(mode: str, flags: list[str]) -> dict[str, Any]:
    """plan.json's account of how the device code was (or will be) compiled."""
    if mode == "required":
        return {"mode": mode, "flags": flags}
    return {"mode": mode, "flags": [], "runtime_compiler": RUNTIME_COMPILER}


class CudaExecutable(Executable):
    """Kernels + plans; device state (uploaded weights, loaded libraries) made on first run."""

    def __init__(self, module: Module, plans: dict[str, FunctionPlan], kernels: dict[str, dict[str, Any]],
                 blobs: dict[str, bytes], derived: dict[str, dict[int, np.ndarray]], info: dict[str, Any]) -> None:
        self.module, self.plans, self.kernels, self.blobs = module, plans, kernels, blobs
        self.derived, self.info = derived, info
        self._executors: dict[str, CudaPlanExecutor] | None = None
        self._libraries: KernelLibraries | None = None

    # ------------------------------------------------------------ running

    def _prepare(self) -> dict[str, CudaPlanExecutor]:
        if self._executors is not None:
            return self._executors
        device = require_gpu()
        from .llvm_target import resolve_consts
        for key, meta in self.kernels.items():
            fatbin = self.blobs.get(f"kernels/{key}.fatbin")
            if fatbin is not None:
                BINARIES.add(meta["source_sha256"], fatbin)
        BINARIES.install()
        self._libraries = KernelLibraries()
        loaded: dict[str, DeviceKernel] = {}
        for key, meta in self.kernels.items():
            fn = self._libraries.load(key, self.blobs[f"kernels/{key}.so"], meta["functions"], DEFAULT_GEMV.max_rows)
            loaded[key] = DeviceKernel(fn, tuple(ScratchSpec.from_json(s) for s in meta["scratch"]))
        self._executors = {name: CudaPlanExecutor(plan, loaded, resolve_consts(self.module, plan, self.derived.get(name)),
                                                  device)
                           for name, plan in self.plans.items()}
        return self._executors

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function not in self.plans:
            raise BitsmithError(f"no compiled function {function!r}; have {sorted(self.plans)}")
        return self._prepare()[function].run(args)

    # ------------------------------------------------------------ artifact

    def files(self) -> dict[str, bytes]:
        doc = {"format": PLAN_FORMAT, "target": TARGET, "arch": self.info["arch"],
               "act_dtype": self.info["act_dtype"], "nvcc": self.info["nvcc"],
               "functions": [p.to_json() for p in self.plans.values()],
               "kernels": [self.kernels[k] for k in sorted(self.kernels)]}
        return {**self.blobs, "plan.json": json.dumps(doc, sort_keys=True).encode()}

    def report(self) -> dict[str, Any]:
        ptx = sum(len(v) for k, v in self.blobs.items() if k.endswith(".ptx"))
        calls = sum(1 for p in self.plans.values() for s in p.steps if hasattr(s, "kernel"))
        return {**self.info, "kernels": len(self.kernels), "kernel_calls_per_run": calls, "ptx_bytes": ptx,
                "fatbin_bytes": sum(len(v) for k, v in self.blobs.items() if k.endswith(".fatbin")),
                "prebuilt_binary_hits": BINARIES.hits, "runtime_compiles": BINARIES.misses,
                "executor": "flat plan of TVM CUDA kernels on device tensors"}


def _kernel_blobs(k: "CudaKernel") -> dict[str, bytes]:
    out = {f"kernels/{k.key}.so": k.library, f"kernels/{k.key}.cu": k.source.encode()}
    if k.fatbin is not None and k.ptx is not None:
        out[f"kernels/{k.key}.fatbin"] = k.fatbin
        out[f"kernels/{k.key}.ptx"] = k.ptx.encode()
    return out


def compile_module(module: Module, options: Mapping[str, Any]) -> CudaExecutable:
    """Lower, schedule and compile every kernel of ``module`` (no GPU needed); nvcc per option
    ``nvcc`` (a missing nvcc under "required" raises NvccMissingError before any work)."""
    from .cuda_build import NVCC_MISSING, CudaCompiler, NvccMissingError, nvcc_flags, nvcc_path
    from .lowering import lower_function
    from .schedule_cuda import cuda_target
    arch, act = _options(options)
    mode = nvcc_mode(options)
    if mode == "required" and nvcc_path() is None:
        raise NvccMissingError(NVCC_MISSING)
    target = cuda_target(arch)
    t0 = time.perf_counter()
    work = convert_activations(module, act)
    compiler = CudaCompiler(target, use_nvcc=mode == "required")
    plans: dict[str, FunctionPlan] = {}
    kernels: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    derived: dict[str, dict[int, np.ndarray]] = {}
    for fn in work.functions:
        plan, kdefs, consts = lower_function(work, fn, TARGET)
        rename: dict[str, str] = {}
        for digest, kdef in kdefs.items():
            k = compiler.compile(kdef)
            rename[digest] = k.key
            kernels[k.key] = k.meta()
            blobs.update(_kernel_blobs(k))
        for s in plan.steps:
            if hasattr(s, "kernel"):
                s.kernel = rename[s.kernel]
        plans[fn.name] = plan
        derived[fn.name] = consts
    info = {"arch": arch, "act_dtype": act, "target": str(target.export().get("kind")) + f" {arch}",
            "compile_seconds": time.perf_counter() - t0, "kernel_compile_seconds": compiler.compile_seconds,
            "nvcc_seconds": compiler.nvcc_seconds, "nvcc": nvcc_record(mode, nvcc_flags(target)),
            "cache_hits": compiler.hits, "cache_misses": compiler.misses, "schedule": SCHEDULE_ID}
    return CudaExecutable(work, plans, kernels, blobs, derived, info)


def build(module: Module, options: Mapping[str, Any]) -> Executable:
    return compile_module(module, options)


def load(module: Module, options: Mapping[str, Any], files: Mapping[str, bytes]) -> Executable:
    """Rebuilds the executable from an artifact's files; compiles nothing."""
    arch, act = _options(options)
    doc = read_plan_doc(files, TARGET)
    if not isinstance(doc.get("kernels"), list):
        raise PlanError("plan.json: a tvm-cuda plan lists its kernels")
    plans = {p.name: p for p in (FunctionPlan.from_json(d) for d in doc["functions"])}
    nvcc = _read_nvcc_record(doc.get("nvcc"))
    kernels: dict[str, dict[str, Any]] = {}
    for meta in doc["kernels"]:
        if not isinstance(meta, dict) or not isinstance(meta.get("key"), str) \
                or not isinstance(meta.get("functions"), list) or not isinstance(meta.get("scratch"), list):
            raise PlanError(f"plan.json: malformed kernel entry {meta!r}"[:200])
        key = meta["key"]
        for ext in ("so", "cu") + (("fatbin", "ptx") if nvcc["mode"] == "required" else ()):
            if f"kernels/{key}.{ext}" not in files:
                raise PlanError(f"plan.json lists kernel {key} but kernels/{key}.{ext} is missing")
        if source_digest(files[f"kernels/{key}.cu"].decode()) != meta.get("source_sha256"):
            raise PlanError(f"kernels/{key}.cu does not match its recorded sha256")
        for s in meta["scratch"]:
            ScratchSpec.from_json(s)
        kernels[key] = meta
    for plan in plans.values():
        for s in plan.steps:
            if hasattr(s, "kernel") and s.kernel not in kernels:
                raise PlanError(f"plan.json calls kernel {s.kernel} that it does not list")
    work = convert_activations(module, str(doc.get("act_dtype", act)))
    blobs = {n: bytes(v) for n, v in files.items() if n.startswith("kernels/")}
    info = {"arch": str(doc.get("arch", arch)), "act_dtype": str(doc.get("act_dtype", act)),
            "compile_seconds": 0.0, "loaded_from_artifact": True, "schedule": SCHEDULE_ID, "nvcc": nvcc}
    return CudaExecutable(work, plans, kernels, blobs, {}, info)


def _read_nvcc_record(rec: Any) -> dict[str, Any]:
    """plan.json's "nvcc" entry, checked: under "required" every kernel must carry its fatbin."""
    if not isinstance(rec, dict) or rec.get("mode") not in NVCC_MODES or not isinstance(rec.get("flags"), list) \
            or not all(isinstance(f, str) for f in rec["flags"]):
        raise PlanError(f"plan.json: malformed nvcc entry {rec!r} (want mode in {NVCC_MODES} and a list of flags)"[:200])
    return {"mode": rec["mode"], "flags": list(rec["flags"]),
            **({"runtime_compiler": RUNTIME_COMPILER} if rec["mode"] == "skip" else {})}


register_target(TargetSpec(TARGET, option_defaults, build, load,
                           doc="GPU kernels (TVM TIR scheduled for CUDA, fp16 activations), PTX/fatbin by nvcc"))
