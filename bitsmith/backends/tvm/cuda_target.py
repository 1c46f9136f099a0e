"""Target ``tvm-cuda``: fused TIR kernels scheduled for NVIDIA GPUs, built with nvcc.

Options: ``arch`` (default "sm_90", H100), ``act_dtype`` (default "float16": activations
and dense weights in fp16 by pass ``half-precision``, the ``lower`` phase of this target's
pipeline, so the artifact stores the fp16 module; "float32" keeps the module as is) and ``nvcc``
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

from ...errors import BitsmithError, OptionError
from ...ir import Module
from ..base import Executable, Pipeline
from .. import native_loader
from .cuda_runtime import (BINARIES, SCHEDULE_ID, CudaPlanExecutor, DeviceKernel, KernelLibraries, host_spec,
                           require_gpu, source_digest)
from .cuda_scratch import ScratchSpec
from ..files import target_files
from ..json_fields import Field
from .plan import (MAX_DIM, PLAN_FORMAT, Call, FunctionPlan, PlanError, checked_kernel_key, read_function_plans,
                   read_native_spec, read_plan_doc)
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


def pipeline(options: Mapping[str, Any]) -> Pipeline:
    """Calls inlined (kernels are planned per function), then fp16 activations (pass
    ``half-precision``) unless ``act_dtype="float32"``."""
    _, act = _options(options)
    from .targets import legalize_specs
    return Pipeline(legalize=legalize_specs(), lower=("half-precision",) if act == "float16" else ())


def _check_act_dtype(module: Module, act: str) -> None:
    """The module ``build`` gets must be the one this target's pipeline made: its float
    parameters in ``act`` (an fp32 module under act_dtype float16 skipped ``half-precision``)."""
    floats = {p.type.dtype for fn in module.functions for p in fn.params if p.type.dtype in ACT_DTYPES}
    if floats - {act}:
        raise BitsmithError(f"tvm-cuda build: the module has {sorted(floats)} parameters but act_dtype is "
                            f"{act!r}; compile through bitsmith.compile, which runs the target's pipeline "
                            f"(half-precision for float16)")


def _options(options: Mapping[str, Any]) -> tuple[str, str]:
    arch = options.get("arch", DEFAULT_ARCH)
    act = options.get("act_dtype", "float16")
    if act not in ACT_DTYPES:
        raise OptionError(f"tvm-cuda option act_dtype must be one of {ACT_DTYPES}, got {act!r}")
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


def kv_state_results(module: Module, function: str) -> frozenset[int]:
    """Indices of the results that come back as parameters on the next call (the kv-cache
    pass's ``present_X`` for its ``past_X``): they keep the dtype the module gives them, so
    an fp16 cache (act_dtype float16) stays fp16 on the host, as ``empty_cache`` allocates it
    from the same parameter types."""
    fn = module.function(function)
    params = {p.name: p.type for p in fn.params}
    types = fn.value_types()
    kept = set()
    for k, r in enumerate(fn.results):
        past = params.get("past_" + r.removeprefix("present_")) if r.startswith("present_") else None
        if past is not None and past.dtype == types[r].dtype:
            kept.add(k)
    return frozenset(kept)


class CudaExecutable(Executable):
    """Kernels + plans; device state (uploaded weights, loaded libraries) made on first run."""

    def __init__(self, module: Module, plans: dict[str, FunctionPlan], kernels: dict[str, dict[str, Any]],
                 blobs: dict[str, bytes], derived: dict[str, dict[int, np.ndarray]], info: dict[str, Any],
                 spec: native_loader.NativeSpec | None = None, kv_append: Mapping[str, str] | None = None) -> None:
        self.module, self.plans, self.kernels, self.blobs = module, plans, kernels, blobs
        self.derived, self.info, self.spec = derived, info, spec
        self.kv_append = dict(kv_append or {})  # cache dtype -> kernel key (device-resident decode)
        self._loaded: dict[str, DeviceKernel] = {}
        self._executors: dict[str, CudaPlanExecutor] | None = None
        self._libraries: KernelLibraries | None = None
        self._consts: dict[str, dict[int, np.ndarray]] | None = None  # resolved at load (checked), uploaded on first run

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
            scratch = tuple(ScratchSpec.from_json(s) for s in meta["scratch"])
            fn = self._libraries.load(key, self.blobs[f"kernels/{key}.so"], meta["functions"], DEFAULT_GEMV.max_rows,
                                      scratch)
            loaded[key] = DeviceKernel(fn, scratch)
        self._loaded = loaded
        consts = self._consts or {}
        self._executors = {name: CudaPlanExecutor(plan, loaded, consts[name] if name in consts else
                                                  resolve_consts(self.module, plan, self.derived.get(name)), device,
                                                  kv_state_results(self.module, name))
                           for name, plan in self.plans.items()}
        self._consts = None  # on the device now
        return self._executors

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function not in self.plans:
            raise BitsmithError(f"no compiled function {function!r}; have {sorted(self.plans)}")
        return self._prepare()[function].run(args)

    def device_decoder(self, graphs: bool = True) -> Any:
        """A ``cuda_decode.DeviceDecoder`` for ``main``: KV cache kept on the GPU, each decode
        step one CUDA-graph launch (``graphs=False``: per-kernel launches). DeviceDecodeUnavailable
        for artifacts without an attention mask input or kv_append kernels."""
        from .cuda_decode import DeviceDecoder
        executors = self._prepare()
        append = {dtype: self._loaded[key].fn for dtype, key in self.kv_append.items()}
        return DeviceDecoder(executors["main"], self.module, append, require_gpu(), graphs=graphs)

    # ------------------------------------------------------------ artifact

    def files(self) -> dict[str, bytes]:
        doc = {"format": PLAN_FORMAT, "target": TARGET, "arch": self.info["arch"],
               "act_dtype": self.info["act_dtype"], "nvcc": self.info["nvcc"],
               "functions": [p.to_json() for p in self.plans.values()],
               "kernels": [self.kernels[k] for k in sorted(self.kernels)]}
        if self.kv_append:
            doc["kv_append"] = dict(sorted(self.kv_append.items()))
        if self.spec is not None:
            doc["host_isa"] = self.spec.to_json()
        return {**self.blobs, "plan.json": json.dumps(doc, sort_keys=True).encode()}

    def native_files(self) -> dict[str, native_loader.NativeSpec]:
        """The kernel libraries (host launch code; the device code in them runs on the GPU)."""
        if self.spec is None:
            raise BitsmithError("tvm-cuda kernel libraries of unknown host instruction set cannot be saved")
        return {f"kernels/{key}.so": self.spec for key in self.kernels}

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
    from .anchor_rules import cuda_anchor_rules
    from .kv_append import kv_append_kernel
    from .lowering import lower_function
    from .schedule_cuda import cuda_target
    arch, act = _options(options)
    mode = nvcc_mode(options)
    if mode == "required" and nvcc_path() is None:
        raise NvccMissingError(NVCC_MISSING)
    target = cuda_target(arch)
    _check_act_dtype(module, act)
    t0 = time.perf_counter()
    compiler = CudaCompiler(target, use_nvcc=mode == "required")
    plans: dict[str, FunctionPlan] = {}
    kernels: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    derived: dict[str, dict[int, np.ndarray]] = {}
    for fn in module.functions:
        plan, kdefs, consts = lower_function(module, fn, TARGET, cuda_anchor_rules())
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
    kv_append: dict[str, str] = {}
    for dtype in decode_cache_dtypes(module):
        k = compiler.compile(kv_append_kernel(dtype))
        kernels[k.key] = k.meta()
        blobs.update(_kernel_blobs(k))
        kv_append[dtype] = k.key
    info = {"arch": arch, "act_dtype": act, "target": str(target.export().get("kind")) + f" {arch}",
            "compile_seconds": time.perf_counter() - t0, "kernel_compile_seconds": compiler.compile_seconds,
            "nvcc_seconds": compiler.nvcc_seconds, "nvcc": nvcc_record(mode, nvcc_flags(target)),
            "cache_hits": compiler.hits, "cache_misses": compiler.misses, "schedule": SCHEDULE_ID}
    return CudaExecutable(module, plans, kernels, blobs, derived, info, host_spec(target), kv_append)


def decode_cache_dtypes(module: Module) -> list[str]:
    """Cache dtypes of a causal LM's ``main`` that takes an attention mask (kv-cache pass): the
    kv_append kernels device-resident decode needs (``cuda_decode``); none for other modules."""
    fn = next((f for f in module.functions if f.name == "main"), None)
    if module.attr("kind") != "causal_lm" or fn is None or len(fn.params) < 4 or fn.params[-1].name != "attention_mask":
        return []
    return sorted({p.type.dtype for p in fn.params[2:-1]})


def build(module: Module, options: Mapping[str, Any]) -> Executable:
    return compile_module(module, options)


def load(module: Module, options: Mapping[str, Any], files: Mapping[str, bytes]) -> Executable:
    """Rebuilds the executable from an artifact's files; compiles nothing. A malformed plan.json
    or kernel entry raises ArtifactError naming file and field."""
    arch, act = _options(options)
    files = target_files(files)
    doc = read_plan_doc(files, TARGET)
    plans = read_function_plans(doc)
    nvcc = _read_nvcc_record(doc["nvcc"])
    required = ("so", "cu") + (("fatbin", "ptx") if nvcc["mode"] == "required" else ())
    kernels: dict[str, dict[str, Any]] = {}
    blobs: dict[str, bytes] = {}
    for meta in doc["kernels"].list():
        key = checked_kernel_key(meta["key"])
        for fn in meta["functions"].list():
            fn.str()
        for s in meta["scratch"].list():
            try:
                spec_ = ScratchSpec.from_json(s.value)
            except (BitsmithError, KeyError, TypeError, ValueError, IndexError) as e:
                s.fail(f"malformed scratch spec: {type(e).__name__}: {e}"[:200])
            _check_scratch(s, spec_, key, plans)
        for ext in ("so", "cu", "fatbin", "ptx"):
            name = f"kernels/{key}.{ext}"
            if name in files:
                blobs[name] = files[name]
            elif ext in required:
                meta["key"].fail(f"kernel {key} is listed but {name} is not in the artifact "
                                 f"(nvcc mode {nvcc['mode']!r})")
        try:
            source = blobs[f"kernels/{key}.cu"].decode()
        except UnicodeDecodeError:
            raise PlanError(files.path(f"kernels/{key}.cu"), "not UTF-8 text") from None
        if source_digest(source) != meta["source_sha256"].str():
            meta["source_sha256"].fail(f"kernels/{key}.cu does not match it")
        kernels[key] = meta.obj()
    for plan in plans.values():
        for s in plan.steps:
            if hasattr(s, "kernel") and s.kernel not in kernels:
                doc["kernels"].fail(f"function {plan.name!r} calls kernel {s.kernel}, which is not listed")
    spec = read_native_spec(doc, "host_isa")
    act_doc = doc["act_dtype"].str(choices=ACT_DTYPES) if doc.has("act_dtype") else act
    arch_doc = doc["arch"].str() if doc.has("arch") else arch
    from .llvm_target import resolve_consts
    # the artifact stores the module after the pipeline (half-precision): nothing is converted
    # here, and a plan that does not fit it (an fp32 module under an fp16 plan) is refused
    consts = {name: resolve_consts(module, plan, None, files.path("plan.json")) for name, plan in plans.items()}
    info = {"arch": arch_doc, "act_dtype": act_doc,
            "compile_seconds": 0.0, "loaded_from_artifact": True, "schedule": SCHEDULE_ID, "nvcc": nvcc}
    kv_append = {}
    if doc.has("kv_append"):  # optional: artifacts before device-resident decode have none
        for dtype, key in doc["kv_append"].obj().items():
            if not isinstance(key, str) or dtype not in ACT_DTYPES or key not in kernels:
                doc["kv_append"].fail(f"entry {dtype!r}: {key!r} is not a listed kernel of a cache dtype"[:200])
            kv_append[dtype] = key
    exe = CudaExecutable(module, plans, kernels, blobs, {}, info, spec, kv_append)
    exe._consts = consts
    return exe


def _check_scratch(f: Field, spec: ScratchSpec, key: str, plans: Mapping[str, FunctionPlan]) -> None:
    """A scratch spec fits every call of its kernel: its dtype is a real one, its position lies
    among the extra parameters after the call's inputs, and every dim is >= 0 or names an axis of
    an input the call has (``ScratchSpec.shape`` indexes the inputs on every call)."""
    f["dtype"].str(choices=SCRATCH_DTYPES)
    for plan in plans.values():
        types = plan.slot_types()
        for s in plan.steps:
            if not isinstance(s, Call) or s.kernel != key:
                continue
            n_in = len(s.inputs)
            if spec.position < n_in or spec.position > n_in + 64:
                f["position"].fail(f"{spec.position} is not after the {n_in} inputs of kernel {key}")
            for j, d in enumerate(spec.dims):
                if isinstance(d, int):
                    if not 0 <= d <= MAX_DIM:
                        f["dims"][j].fail(f"{d} is outside [0, {MAX_DIM}]")
                    continue
                dims = types.get(s.inputs[d[0]], (None, None))[0] if 0 <= d[0] < n_in else None
                if not 0 <= d[0] < n_in or (dims is not None and not 0 <= d[1] < len(dims)) or d[1] < 0:
                    f["dims"][j].fail(f"({d[0]}, {d[1]}) is not an axis of an input of kernel {key} "
                                      f"({n_in} inputs)")


SCRATCH_DTYPES = ("float32", "float16", "int32", "int64", "int8", "uint8")


def _read_nvcc_record(rec: Field) -> dict[str, Any]:
    """plan.json's "nvcc" entry, checked: under "required" every kernel must carry its fatbin."""
    mode = rec["mode"].str(choices=NVCC_MODES)
    flags = [f.str() for f in rec["flags"].list()]
    return {"mode": mode, "flags": flags, **({"runtime_compiler": RUNTIME_COMPILER} if mode == "skip" else {})}


register_target(TargetSpec(TARGET, option_defaults, build, load,
                           doc="GPU kernels (TVM TIR scheduled for CUDA, fp16 activations), PTX/fatbin by nvcc",
                           pipeline=pipeline))
