"""Target ``tvm-llvm``: fused TIR kernels compiled by LLVM for the host CPU.

Options: ``mcpu`` ("host" = ``llvm_get_system_cpu()``; or an LLVM CPU name such as the
portable baseline "x86-64-v3"), ``threads`` (0 = every core; see ``runtime_cpu``) and
``activation_bits`` (32; 8 = activations quantized to int8 per weight group with integer dot
products, as llama.cpp computes them, in the layers an int8 kernel covers: ``qlinear_a8``, GGUF
Q4_0 / Q4_1 / Q8_0 in groups of 32; ``qlinear_a8_wide``, zero-point or grid-table codes such as
rtn-int2 and bitmod-w3 in groups of 128; other layers stay float).
The artifact stores ``plan.json`` (with ``isa``: the concrete CPU name ``mcpu`` resolved to and
the cpuinfo flags it implies) and ``kernels/<key>.so``; loading hands those bytes to
``native_loader`` (trust, CPU and private-copy checks) and never calls the compiler.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tvm

from ...errors import BitsmithError, OptionError
from ...ir import Module
from .. import native_loader
from ..json_fields import Field
from ..base import Executable
from . import kv_inplace, last_logits, native_step, runtime_cpu, stored_operands
from .cache import KernelCache
from .executor import PlanExecutor
from .lowering import LoweringContext, lower_function
from ..files import target_files
from .plan import (EXTERN_PREFIX, PLAN_FORMAT, Call, FunctionPlan, PlanError, read_function_plans, read_native_spec,
                   read_plan_doc)
from .schedule_cpu import SCHEDULE_ID, describe_cpu_schedule, schedule_cpu
from .targets import TargetSpec, llvm_pipeline, register_target

TARGET = "tvm-llvm"
KERNEL_KIND = "tvm-llvm-kernel"


ACTIVATION_BITS = (32, 8)


KV_DTYPES = ("float32", "float16")


def option_defaults() -> dict[str, Any]:
    return {"mcpu": "host", "threads": 0, "activation_bits": 32, "kv_dtype": "float32"}


def _kv_dtype(options: Mapping[str, Any]) -> str | None:
    """The in-place KV cache's type when it differs from float32 (None: the model's own)."""
    d = options.get("kv_dtype", "float32")
    if d not in KV_DTYPES:
        raise OptionError(f"tvm-llvm option kv_dtype must be one of {KV_DTYPES} (the in-place KV cache of "
                          f"generate(); float16 halves what attention reads), got {d!r}")
    return None if d == "float32" else d


def _activation_bits(options: Mapping[str, Any]) -> int:
    a = options.get("activation_bits", 32)
    if isinstance(a, bool) or a not in ACTIVATION_BITS:
        raise OptionError(f"tvm-llvm option activation_bits must be one of {ACTIVATION_BITS} (8: int8 activations, "
                          f"W4A8, in the GGUF Q4_0 / Q4_1 / Q8_0 layers), got {a!r}")
    return int(a)


def resolve_mcpu(mcpu: Any) -> str:
    if not isinstance(mcpu, str) or not mcpu:
        raise OptionError(f"tvm-llvm option mcpu must be a CPU name or 'host', got {mcpu!r}")
    return runtime_cpu.host_cpu() if mcpu in ("host", "native") else mcpu


def make_target(options: Mapping[str, Any]) -> Any:
    mcpu = resolve_mcpu(options.get("mcpu", "host"))
    try:
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    except Exception as e:  # TVM rejects unknown CPU names with its own error type
        raise BitsmithError(f"tvm-llvm: bad mcpu {mcpu!r}: {e}") from None


def _threads(options: Mapping[str, Any]) -> int:
    t = options.get("threads", 0)
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise OptionError(f"tvm-llvm option threads must be an int >= 0 (0 = all cores), got {t!r}")
    return t


def resolve_consts(module: Module, plan: FunctionPlan, derived: Mapping[int, np.ndarray] | None = None,
                   file: str = "plan.json") -> dict[int, np.ndarray]:
    """The arrays of a plan's constant slots (qlinear operands are re-derived from the IR), after
    checking the plan's signature against the IR; a plan that does not fit the module raises
    PlanError naming ``file`` (the artifact's plan.json)."""
    from .matmul import qlinear_operands
    from .qlinear_layout import operand_specs
    out: dict[int, np.ndarray] = {}
    plan.check_against(module, file)
    fn = module.function(plan.name)
    producers = fn.producers()
    operands: dict[str, list[np.ndarray]] = {}
    specs: dict[str, list[tuple[tuple[int, ...], str]]] = {}

    def qlinear_inputs(c: Any) -> tuple[Any, list[np.ndarray]]:
        node = producers.get(c.qlinear)
        if node is None or node.op != "qlinear":
            raise PlanError(file, f"plan names qlinear value {c.qlinear!r} that the module lacks"[:200])
        return node, [module.tensors[producers[i].attr("name")] for i in node.inputs[1:]]

    for c in plan.consts:
        if c.tensor:
            if c.tensor not in module.tensors:
                raise PlanError(file, f"plan names tensor {c.tensor!r} that the module lacks"[:200])
            out[c.slot] = module.tensors[c.tensor]
        elif c.scalar is not None:
            out[c.slot] = np.array(c.scalar[0], dtype=np.dtype(c.scalar[1]))
        elif derived is not None and c.slot in derived:
            if c.qlinear not in specs:  # a stored operand: its shape and dtype must be the derived one's
                node, arrays = qlinear_inputs(c)
                specs[c.qlinear] = operand_specs(node.attr_dict, arrays, plan.act_dtype)
            a, want = derived[c.slot], specs[c.qlinear]
            if not 0 <= c.index < len(want):
                raise PlanError(file, f"consts: operand index {c.index} of qlinear {c.qlinear!r} is outside "
                                      f"[0, {len(want)})"[:200])
            if (tuple(a.shape), a.dtype.name) != want[c.index]:
                raise PlanError(file, f"operands: stored operand for {plan.name!r} slot {c.slot} is {a.dtype.name}{list(a.shape)}, "
                                      f"but qlinear {c.qlinear!r} operand {c.index} is "
                                      f"{want[c.index][1]}{list(want[c.index][0])}"[:200])
            out[c.slot] = a
        else:
            if c.qlinear not in operands:
                node, arrays = qlinear_inputs(c)
                operands[c.qlinear] = qlinear_operands(node.attr_dict, arrays, plan.act_dtype)
            if not 0 <= c.index < len(operands[c.qlinear]):
                raise PlanError(file, f"consts: operand index {c.index} of qlinear {c.qlinear!r} is outside "
                                      f"[0, {len(operands[c.qlinear])})"[:200])
            out[c.slot] = operands[c.qlinear][c.index]
    return out


def check_kernels(plans: Mapping[str, FunctionPlan], kernels: Mapping[str, Any], file: str) -> None:
    """Every kernel key a plan calls has a kernel (an extern one supplied by the caller included);
    PlanError naming ``file`` otherwise, before any executor is built."""
    for plan in plans.values():
        for k, s in enumerate(plan.steps):
            if isinstance(s, Call) and s.kernel not in kernels:
                raise PlanError(file, f"functions[{plan.name!r}].steps[{k}].call: kernel {s.kernel} is "
                                      f"{'an unknown extern' if s.kernel.startswith(EXTERN_PREFIX) else 'not loaded'}"[:200])


class LLVMExecutable(Executable):
    """``executors``: per function, or a function making them on first use (a fresh build: a
    compile that is only saved never copies the weights into aligned run buffers)."""

    def __init__(self, host: "HostBuild", executors: dict[str, PlanExecutor] | Callable[[], dict[str, PlanExecutor]],
                 options: Mapping[str, Any]) -> None:
        self.host = host
        self._executors, self._make_executors = (None, executors) if callable(executors) else (executors, None)
        self.plans, self.libraries, self.info = host.plans, host.libraries, host.info
        self.options = dict(options)
        self.threads = _threads(options)

    @property
    def executors(self) -> dict[str, PlanExecutor]:
        if self._executors is None:
            self._executors = self._make_executors()
        return self._executors

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function not in self.executors:
            raise BitsmithError(f"no compiled function {function!r}; have {sorted(self.executors)}")
        runtime_cpu.set_threads(self.threads)
        ex = self.executors[function]
        return ex.run_python(args) if self.python_steps and hasattr(ex, "run_python") else ex.run(args)

    python_steps = False  # True: kernels called one by one from Python (benchmarks, tests compare)

    def kv_session(self) -> "kv_inplace.KVSession | None":
        """Caches updated in place for one generation (``kv_inplace``); None for artifacts without
        the variant."""
        return kv_session(self.executors, self.run)

    def files(self) -> dict[str, bytes]:
        return self.host.files()

    def native_files(self) -> dict[str, native_loader.NativeSpec]:
        return self.host.native_files()

    def report(self) -> dict[str, Any]:
        calls = sum(1 for p in self.plans.values() for s in p.steps if isinstance(s, Call))
        return {**self.info, "kernels": len(self.libraries), "kernel_calls_per_run": calls,
                "threads": self.threads, "threads_effective": runtime_cpu.num_threads(),
                "executor": step_executor_name(self.executors, self.python_steps)}


def kv_session(executors: Mapping[str, Any], run: Callable) -> "kv_inplace.KVSession | None":
    ex = executors.get(kv_inplace.KEY)
    return kv_inplace.KVSession(run, ex, executors.get(last_logits.KEY)) if ex is not None else None


# main's variants (executor key -> plan.json field), each sharing main's constants; the last-logits
# variant is derived from the in-place one and runs on the same caches
VARIANT_FIELDS = {kv_inplace.KEY: kv_inplace.PLAN_FIELD, last_logits.KEY: last_logits.PLAN_FIELD}


def step_executor_name(executors: Mapping[str, Any], python_steps: bool = False) -> str:
    native = not python_steps and any(isinstance(e, native_step.NativePlanExecutor) for e in executors.values())
    return ("flat plan of TVM llvm kernels on 64-byte aligned buffers, "
            + ("one native call per run (driver/stepdrv.so)" if native else "called one by one from Python"))


@dataclass
class HostBuild:
    """Compiled plans of every function of a module, with their kernel libraries loaded.

    Plan steps whose keys start with ``EXTERN_PREFIX`` are not TVM kernels: ``executors`` takes
    their callables from the caller (another backend running some ops on its own engine).
    """

    plans: dict[str, FunctionPlan]
    libraries: dict[str, bytes]
    loaded: dict[str, Callable]
    derived: dict[str, dict[int, np.ndarray]]
    info: dict[str, Any]
    spec: native_loader.NativeSpec | None = None  # what the kernels were built for (None: unrecorded)
    plan_file: str = "plan.json"  # the artifact path of plan.json that errors name
    driver: bytes | None = None   # native_step's driver library (None: plans run on the Python executor)
    variants: dict[str, FunctionPlan] = field(default_factory=dict)  # VARIANT_FIELDS' keys (older artifacts: fewer)

    def executors(self, module: Module, externs: Mapping[str, Callable] | None = None) -> dict[str, Any]:
        """Per function, a NativePlanExecutor (one C call per run) where the driver is here and
        every extern step has a native entry point, else the Python PlanExecutor."""
        kernels = {**self.loaded, **(externs or {})}
        check_kernels(self.plans, kernels, self.plan_file)
        python = {name: PlanExecutor(p, kernels, resolve_consts(module, p, self.derived.get(name), self.plan_file),
                                     self.plan_file)
                  for name, p in self.plans.items()}
        for key, variant in self.variants.items():  # main's constants, shared (not copied)
            if kv_inplace.FUNCTION not in python:
                raise PlanError(self.plan_file, f"{VARIANT_FIELDS[key]}: a variant of {kv_inplace.FUNCTION!r}, "
                                                "which has no plan")
            if variant.consts != self.plans[kv_inplace.FUNCTION].consts:
                raise PlanError(self.plan_file, f"{VARIANT_FIELDS[key]}: constants differ from "
                                                f"{kv_inplace.FUNCTION!r}'s, whose arrays it shares")
            python[key] = PlanExecutor(variant, kernels, {}, self.plan_file, shared=python[kv_inplace.FUNCTION])
        driver = self.step_driver()
        if driver is not None and all(isinstance(fn, native_step.NativeExtern) for fn in (externs or {}).values()):
            python = {name: native_step.NativePlanExecutor(ex, kernels, driver) for name, ex in python.items()}
        for key in self.variants:
            python[key] = kv_inplace.KVInplaceExecutor(python[key], self.plans[kv_inplace.FUNCTION], key)
        return python

    def step_driver(self) -> "native_step.Driver | None":
        if self.driver is None:
            return None
        if not hasattr(self, "_driver"):
            self._driver = native_step.Driver(self.driver, self.plan_file.rsplit("plan.json", 1)[0]
                                              + native_step.DRIVER_FILE)
        return self._driver

    def used_kernels(self) -> set[str]:
        """Kernel keys the stored plans call (the variant's included): what an artifact keeps."""
        plans = [*self.plans.values(), *self.variants.values()]
        return {s.kernel for p in plans for s in p.steps if isinstance(s, Call) and s.kernel in self.libraries}

    def files(self) -> dict[str, bytes]:
        operands, out = stored_operands.to_files(self.plans, self.derived)
        used = self.used_kernels()
        plan = {"format": PLAN_FORMAT, "target": TARGET, "mcpu": self.info["mcpu"],
                "functions": [p.to_json() for p in self.plans.values()], "operands": operands,
                "schedules": {k: v for k, v in self.info["kernel_schedules"].items() if k in used}}
        for key, variant in self.variants.items():
            plan[VARIANT_FIELDS[key]] = [variant.to_json()]
        if self.spec is not None:
            plan["isa"] = self.spec.to_json()
        if self.driver is not None:
            plan["driver_isa"] = native_step.SPEC.to_json()
            out[native_step.DRIVER_FILE] = self.driver
        out.update({f"kernels/{k}.so": v for k, v in self.libraries.items() if k in used})
        out["plan.json"] = json.dumps(plan, sort_keys=True).encode()
        return out

    def native_files(self) -> dict[str, native_loader.NativeSpec]:
        if self.spec is None:
            raise BitsmithError("tvm-llvm kernels of unknown instruction set cannot be saved")
        driver = {native_step.DRIVER_FILE: native_step.SPEC} if self.driver is not None else {}
        return {**{f"kernels/{k}.so": self.spec for k in sorted(self.used_kernels())}, **driver}


def compile_host(module: Module, options: Mapping[str, Any],
                 anchor_rules: Mapping[str, Callable] | None = None) -> HostBuild:
    """Lowers and compiles (or takes from the kernel cache) every function's kernels."""
    target = make_target(options)
    _threads(options)
    if _activation_bits(options) == 8:
        from .anchor_rules import qlinear_a8
        anchor_rules = {"qlinear": qlinear_a8, **(anchor_rules or {})}
    spec = native_loader.llvm_spec(KERNEL_KIND, target)
    cache = KernelCache()
    t0 = time.perf_counter()
    plans: dict[str, FunctionPlan] = {}
    libraries: dict[str, bytes] = {}
    loaded: dict[str, Callable] = {}
    derived_by_fn: dict[str, dict[int, np.ndarray]] = {}
    schedules: dict[str, dict[str, str]] = {}
    lower_seconds = 0.0
    variants: dict[str, FunctionPlan] = {}
    for fn in module.functions:
        t1 = time.perf_counter()
        plan, kdefs, derived = lower_function(module, fn, TARGET, anchor_rules)
        variant = (_inplace_variant(module, fn, plan, kdefs, _kv_dtype(options)) if fn.name == kv_inplace.FUNCTION
                   else None)
        last = _last_logits_variant(variant, kdefs) if variant is not None else None
        lower_seconds += time.perf_counter() - t1
        rename: dict[str, str] = {}
        for digest, (key, data) in cache.libraries(kdefs, schedule_cpu, SCHEDULE_ID, target).items():
            kdef = kdefs[digest]
            rename[digest] = key
            schedules[key] = {"kernel": kdef.name, "schedule": describe_cpu_schedule(kdef)}
            if key not in loaded:
                libraries[key] = data
                native_loader.grant_built(data, spec)  # compiled here, or a digest-checked cache entry
                loaded[key] = runtime_cpu.load_module(data, f"kernels/{key}.so")["main"]
        for p in (plan, variant, last):
            for s in p.steps if p is not None else ():
                if isinstance(s, Call) and not s.kernel.startswith(EXTERN_PREFIX):
                    s.kernel = rename[s.kernel]
        plans[fn.name] = plan
        if variant is not None:
            variants[kv_inplace.KEY] = variant
        if last is not None:
            variants[last_logits.KEY] = last
        derived_by_fn[fn.name] = derived
    if _activation_bits(options) == 8 and not any(v["schedule"] == "vector-qlinear-a8" for v in schedules.values()):
        from ...ir.quantized import qlinear_nodes
        found = sorted({n.attr("scheme") for _f, n, _c in qlinear_nodes(module)})
        raise OptionError("tvm-llvm activation_bits=8: no layer has an int8-activation kernel (they cover GGUF "
                          "Q4_0 / Q4_1 / Q8_0 blocks in groups of 32, quant='gguf', and zero-point or grid-table "
                          "codes, rtn-int2/3/4/8, bitmod-w3/w4, fp3/fp4, in groups of a multiple of 128 (2-/3-bit), "
                          "64 (4-bit) or 32 (8-bit)); "
                          f"this model's quantized layers: {found or 'none'}")
    info = {"compile_seconds": time.perf_counter() - t0, "lower_seconds": lower_seconds,
            "cache_hits": cache.hits, "cache_misses": cache.misses, "kernel_compile_seconds": cache.compile_seconds,
            "cache_rejected": cache.rejected, "cache_dir": str(cache.directory),
            "mcpu": str(target.attrs.get("mcpu", "")), "isa": spec.describe(), "target": str(target),
            "activation_bits": _activation_bits(options), "kv_dtype": _kv_dtype(options) or "float32",
            "kernel_schedules": schedules}
    driver = native_step.build_driver()
    info["step_driver"] = "native (driver/stepdrv.so)" if driver is not None else "python (no C compiler)"
    info["kv_cache"] = "in place" if variants else "concat (main has no in-place variant)"
    info["prefill_logits"] = "last position" if last_logits.KEY in variants else "every position"
    return HostBuild(plans, libraries, loaded, derived_by_fn, info, spec, driver=driver, variants=variants)


def _inplace_variant(module: Module, fn: Any, plan: FunctionPlan, kdefs: dict,
                     kv_dtype: str | None = None) -> FunctionPlan | None:
    """main's in-place KV variant (its new kernels added to ``kdefs``), or None where main's plan
    does not have the kv-cache pass's shape (a module without attention mask, say); with
    ``kv_dtype`` its caches hold that type. OptionError where kv_dtype is asked for and there is
    no variant (nothing would use it)."""
    from .anchor_rules import attention_args
    from .attention import attention_kernel
    ctx = LoweringContext(module, fn, TARGET)
    try:
        return kv_inplace.derive_plan(fn, plan, lambda node: attention_kernel(*attention_args(node, ctx),
                                                                              capacity=True, kv_dtype=kv_dtype),
                                      kdefs, kv_dtype)
    except kv_inplace.KVInplaceUnavailable as e:
        if kv_dtype:
            raise OptionError(f"tvm-llvm kv_dtype={kv_dtype!r} is the in-place KV cache's type, and this model "
                              f"has none: {e}") from None
        return None


def _last_logits_variant(inplace: FunctionPlan, kdefs: dict) -> FunctionPlan | None:
    """The in-place variant computing the last position's logits only, or None where the plan's
    logits do not have the shape it cuts (generation then slices the full logits)."""
    try:
        return last_logits.derive_plan(inplace, kdefs)
    except last_logits.LastLogitsUnavailable:
        return None


def load_host(files: Mapping[str, bytes]) -> tuple[HostBuild, runtime_cpu.LibraryDir]:
    """The plans and kernel libraries of an artifact (each file hash-checked as it is read, see
    ``backends.files``); the LibraryDir must live as long as the kernels are used. Extern
    kernels are not loaded. A malformed plan raises ArtifactError naming file and field."""
    t0 = time.perf_counter()
    files = target_files(files)
    doc = read_plan_doc(files, TARGET)
    plans = read_function_plans(doc)
    mcpu = doc["mcpu"].str() if doc.has("mcpu") else ""
    derived = stored_operands.from_files(doc["operands"] if doc.has("operands") else [], files, plans)
    spec = read_native_spec(doc, "isa")
    libdir = runtime_cpu.LibraryDir()
    libraries: dict[str, bytes] = {}
    loaded: dict[str, Callable] = {}
    variants: dict[str, FunctionPlan] = {}
    for key, name in VARIANT_FIELDS.items():  # in-place KV since issue 15, last-position logits later
        if not doc.has(name):
            continue
        (variant,) = doc[name].list(1)
        variants[key] = FunctionPlan.from_json(variant)
        if variants[key].name != kv_inplace.FUNCTION:  # whether main's plan is there: executors() (module first)
            doc[name].fail(f"a variant of {variants[key].name!r}, not of {kv_inplace.FUNCTION!r}")
    if last_logits.KEY in variants and kv_inplace.KEY not in variants:
        doc[last_logits.PLAN_FIELD].fail(f"needs the in-place variant {kv_inplace.PLAN_FIELD}, which is absent")
    for plan in [*plans.values(), *variants.values()]:
        for s in plan.steps:
            if isinstance(s, Call) and s.kernel not in loaded and not s.kernel.startswith(EXTERN_PREFIX):
                name = f"kernels/{s.kernel}.so"
                if name not in files:
                    raise PlanError(files.path("plan.json"), f"function {plan.name!r} calls kernel {s.kernel} "
                                                             f"but {name} is not listed in the artifact")
                data = files[name]
                libraries[s.kernel] = data
                loaded[s.kernel] = libdir.load(s.kernel, data)
    schedules = _read_schedules(doc["schedules"], libraries)
    info = {"compile_seconds": 0.0, "load_seconds": time.perf_counter() - t0, "cache_hits": 0, "cache_misses": 0,
            "mcpu": mcpu, "loaded_from_artifact": True,
            "stored_operands": sum(len(d) for d in derived.values()), "kernel_schedules": schedules}
    if spec is not None:
        info["isa"] = spec.describe()
    driver = None
    if doc.has("driver_isa"):  # artifacts since the native step driver
        driver_spec = read_native_spec(doc, "driver_isa")
        if driver_spec != native_step.SPEC:
            doc["driver_isa"].fail(f"expected {native_step.SPEC.describe()}, got {driver_spec.describe()}")
        if native_step.DRIVER_FILE not in files:
            raise PlanError(files.path("plan.json"), f"records a step driver but {native_step.DRIVER_FILE} "
                                                     "is not listed in the artifact")
        driver = files[native_step.DRIVER_FILE]
    info["step_driver"] = "native (driver/stepdrv.so)" if driver is not None else "python (artifact has no driver)"
    info["activation_bits"] = 8 if any(v["schedule"] == "vector-qlinear-a8" for v in schedules.values()) else 32
    if kv_inplace.KEY in variants and kv_inplace.FUNCTION in plans:  # the caches' type, as compiled
        specs, _, _ = kv_inplace.cache_specs(variants[kv_inplace.KEY], plans[kv_inplace.FUNCTION])
        info["kv_dtype"] = str(specs[0].dtype) if specs else "float32"
    info["kv_cache"] = "in place" if variants else "concat (artifact has no in-place variant)"
    info["prefill_logits"] = "last position" if last_logits.KEY in variants else "every position"
    return HostBuild(plans, libraries, loaded, derived, info, spec, files.path("plan.json"), driver, variants), libdir


def _read_schedules(doc: Field, libraries: Mapping[str, bytes]) -> dict[str, dict[str, str]]:
    """plan.json's "schedules": {kernel key: {"kernel": name, "schedule": name}} for every kernel."""
    if set(doc.obj()) != set(libraries):
        doc.fail("must name exactly the kernels the plan loads")
    out: dict[str, dict[str, str]] = {}
    for key in doc.obj():
        entry = doc[key]
        if set(entry.obj()) != {"kernel", "schedule"}:
            entry.fail("expected exactly the fields kernel and schedule")
        out[key] = {"kernel": entry["kernel"].str(), "schedule": entry["schedule"].str()}
    return out


def build(module: Module, options: Mapping[str, Any]) -> Executable:
    host = compile_host(module, options)
    check_kernels(host.plans, host.loaded, host.plan_file)  # what making the executors would check first
    return LLVMExecutable(host, lambda: host.executors(module), options)


def load(module: Module, options: Mapping[str, Any], files: Mapping[str, bytes]) -> Executable:
    host, libdir = load_host(files)
    exe = LLVMExecutable(host, host.executors(module), options)
    exe._libdir = libdir  # keeps the temp dir (and the dlopened files) alive with the executable
    return exe


register_target(TargetSpec(TARGET, option_defaults, build, load,
                           doc="CPU kernels compiled by LLVM (TVM TIR), run from a flat plan on numpy arrays",
                           pipeline=llvm_pipeline))
