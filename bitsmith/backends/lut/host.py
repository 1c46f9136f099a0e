"""The host path of lut-cpu: what runs everything except the quantized linear layers.

Attention, norms, activations and dense linears (lm_head) run on a host; each qlinear calls
the LUT engine. Two hosts, found through ``HOSTS``:

* ``tvm-llvm``: the tvm backend's compiled CPU kernels, with every qlinear lowered to an extern
  plan step that calls the engine (no Python interpreter in the hot path). Needs apache-tvm.
* ``reference-interpreter``: bitsmith's IR interpreter with qlinear swapped for the engine.
  Always available; slow (numpy per op).

Option ``lut_host`` = "auto" (tvm-llvm when TVM is installed), "tvm-llvm" or "reference".
The artifact records the host it was built for; loading an artifact built for tvm-llvm
where TVM is missing falls back to the reference interpreter under "auto" (and says so in
``report()["host_note"]``), or raises under "tvm-llvm". "tvm-llvm" never gives the reference
interpreter: a build that cannot lower the module raises, and so does loading an artifact
whose host path is the reference interpreter.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError, OptionError, UnsupportedOpError
from ...ir import Module, Node, run_function
from ..files import target_files
from .program import INDEX_FILE, LayerEntry

# (entry, x [m, in] float32, out [m, out] float32 or None) -> y [m, out]
LayerRunner = Callable[[LayerEntry, np.ndarray, "np.ndarray | None"], np.ndarray]

HOST_CHOICES = ("auto", "tvm-llvm", "reference")
PORTABLE_MCPU = "x86-64-v3"   # host kernels as portable as lutexec.so's AVX2 build (option mcpu overrides)
FILE_PREFIX = "host/"


def tvm_available() -> bool:
    return importlib.util.find_spec("tvm") is not None


class ReferenceHost:
    name = "reference-interpreter"
    parallel_launcher = None  # the engine uses OpenMP

    def __init__(self, module: Module, layers: Mapping[tuple[str, str], LayerEntry], run_layer: LayerRunner,
                 note: str = "") -> None:
        self.module, self.layers, self.run_layer, self.note = module, layers, run_layer, note

    def _qlinear(self, function: str, xs: Sequence[np.ndarray], node: Node, ctx: Any) -> list[np.ndarray]:
        entry = self.layers.get((function, node.outputs[0].name))
        if entry is None:
            raise BitsmithError(f"no LUT program for qlinear %{node.outputs[0].name} in {function}")
        x = xs[0]
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        y = self.run_layer(entry, x2, None).reshape(x.shape[:-1] + (-1,))
        if node.attr("bias"):
            y = y + xs[-1]
        return [y.astype(x.dtype, copy=False)]

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_function(self.module, function, args,
                            overrides={"qlinear": functools.partial(self._qlinear, function)})

    def files(self) -> dict[str, bytes]:
        return {}

    def native_files(self) -> dict[str, Any]:
        return {}

    def report(self) -> dict[str, Any]:
        return {"host": self.name, **({"host_note": self.note} if self.note else {})}

    @classmethod
    def load(cls, module, layers, run_layer, options, files) -> "ReferenceHost":
        return cls(module, layers, run_layer)


def _extern_name(index: int) -> str:
    """Plan kernel name of the ``index``-th layer of the LUT program (the order program.json keeps)."""
    return f"lut/{index}"


class TVMHost:
    """tvm-llvm plans whose qlinear steps are extern calls ``fn(x2, [bias], out)`` into the engine."""

    name = "tvm-llvm"

    def __init__(self, module: Module, layers: Mapping[tuple[str, str], LayerEntry], run_layer: LayerRunner,
                 host: Any, threads: int, libdir: Any = None) -> None:
        from ..tvm import runtime_cpu
        from ..tvm.plan import EXTERN_PREFIX, PlanError
        from .native import tvm_parallel_launcher
        self._runtime_cpu = runtime_cpu
        self.parallel_launcher = tvm_parallel_launcher()
        self.host, self.threads, self._libdir = host, threads, libdir
        externs: dict[str, Callable] = {}
        by_name = {_extern_name(i): e for i, e in enumerate(layers.values())}
        for plan in host.plans.values():
            for step in plan.steps:
                key = getattr(step, "kernel", "")
                if key.startswith(EXTERN_PREFIX):
                    entry = by_name.get(key[len(EXTERN_PREFIX):])
                    if entry is None:
                        raise PlanError(getattr(host, "plan_file", "plan.json"),
                                        f"functions[{plan.name!r}]: calls {key}, which has no LUT program "
                                        f"(lut/program.json has {len(by_name)} layers)"[:200])
                    externs[key] = functools.partial(_call_layer, run_layer, entry)
        self.executors = host.executors(module, externs)
        self.externs = len(externs)

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function not in self.executors:
            raise BitsmithError(f"no compiled function {function!r}; have {sorted(self.executors)}")
        self._runtime_cpu.set_threads(self.threads)
        return self.executors[function].run(args)

    def files(self) -> dict[str, bytes]:
        return {FILE_PREFIX + k: v for k, v in self.host.files().items()}

    def native_files(self) -> dict[str, Any]:
        return {FILE_PREFIX + k: v for k, v in self.host.native_files().items()}

    def report(self) -> dict[str, Any]:
        info = self.host.info
        keep = ("compile_seconds", "cache_hits", "cache_misses", "kernel_compile_seconds", "mcpu", "load_seconds",
                "kernel_schedules")
        return {"host": self.name, "host_kernels": len(self.host.libraries), "host_engine_calls": self.externs,
                "engine_threads": "TVM thread pool" if self.parallel_launcher else "OpenMP",
                **{f"host_{k}": info[k] for k in keep if k in info}}

    @staticmethod
    def _options(options: Mapping[str, Any]) -> dict[str, Any]:
        return {"mcpu": options.get("mcpu", PORTABLE_MCPU), "threads": options.get("threads", 0)}

    @classmethod
    def build(cls, module, layers, run_layer, options) -> "TVMHost":
        from ..tvm import llvm_target
        index = {key: i for i, key in enumerate(layers)}
        rule = functools.partial(_qlinear_rule, index)
        host = llvm_target.compile_host(module, cls._options(options), anchor_rules={"qlinear": rule})
        return cls(module, layers, run_layer, host, options.get("threads", 0))

    @classmethod
    def load(cls, module, layers, run_layer, options, files) -> "TVMHost":
        from ..tvm import llvm_target
        host, libdir = llvm_target.load_host(target_files(files).under(FILE_PREFIX))
        return cls(module, layers, run_layer, host, options.get("threads", 0), libdir)


def _call_layer(run_layer: LayerRunner, entry: LayerEntry, x2: np.ndarray, *rest: np.ndarray) -> None:
    out = rest[-1]
    run_layer(entry, x2, out)
    if len(rest) == 2:  # bias
        out += rest[0]


def _qlinear_rule(index: Mapping[tuple[str, str], int], node: Node, ctx: Any) -> None:
    """tvm lowering of a qlinear as an extern step: x viewed as [m, in], bias passed along."""
    from ..tvm.anchor_rules import finish_out, flatten_in, matmul_out
    if ctx.types[node.inputs[0]].dtype != "float32":
        raise ctx.unsupported(node, "the LUT engine takes float32 activations")
    x2, lead = flatten_in(node, ctx)
    out = matmul_out(node, ctx, lead)
    bias = [ctx.slot(node.inputs[-1])] if node.attr("bias") else []
    key = (ctx.fn.name, node.outputs[0].name)
    if key not in index:
        raise ctx.unsupported(node, "no LUT program for this qlinear")
    ctx.extern_call(_extern_name(index[key]), [x2] + bias, [out])
    finish_out(node, ctx, out[0])


HOSTS: dict[str, type] = {ReferenceHost.name: ReferenceHost, TVMHost.name: TVMHost}


def check_choice(choice: Any) -> None:
    if choice not in HOST_CHOICES:
        raise OptionError(f"lut_host must be one of {HOST_CHOICES}, got {choice!r}")
    if choice == "tvm-llvm" and not tvm_available():
        raise BitsmithError("lut_host='tvm-llvm' needs apache-tvm (pip install 'bitsmith[tvm]'); "
                            "use lut_host='reference' or 'auto'")


def build_host(choice: str, module, layers, run_layer, options):
    """The host a build uses: tvm-llvm if chosen or (under "auto") if it can lower this module,
    else the reference interpreter, with the reason in ``report()["host_note"]``."""
    if choice == "reference":
        return ReferenceHost(module, layers, run_layer)
    if choice == "auto" and not tvm_available():
        return ReferenceHost(module, layers, run_layer, note="apache-tvm is not installed")
    try:
        return TVMHost.build(module, layers, run_layer, options)
    except (ImportError, UnsupportedOpError) as e:
        if choice == "tvm-llvm":
            raise
        return ReferenceHost(module, layers, run_layer, note=f"tvm-llvm host unavailable: {e}")


def load_host(recorded: str, choice: str, module, layers, run_layer, options, files):
    """The host of a loaded artifact: the one it recorded, or the reference interpreter (see module doc)."""
    if recorded not in HOSTS:
        raise BitsmithError(f"the artifact's LUT program names host {recorded!r}; this runtime knows {sorted(HOSTS)}")
    if recorded == TVMHost.name and not tvm_available():
        if choice == "tvm-llvm":
            raise BitsmithError("this artifact's host path is tvm-llvm and needs apache-tvm, which is not installed")
        return ReferenceHost(module, layers, run_layer,
                             note="artifact built for host tvm-llvm; TVM is not installed, so the reference "
                                  "interpreter runs the host path")
    if recorded == TVMHost.name and choice == "reference":
        return ReferenceHost(module, layers, run_layer, note="lut_host='reference' chosen at load")
    if recorded == ReferenceHost.name and choice == "tvm-llvm":  # refused, as build_host refuses it
        raise ArtifactError(target_files(files).path(INDEX_FILE), "records host 'reference-interpreter' (no tvm-llvm host "
                                                    "kernels), but the options ask for lut_host='tvm-llvm'; "
                                                    "recompile with lut_host='tvm-llvm'")
    return HOSTS[recorded].load(module, layers, run_layer, options, files)
