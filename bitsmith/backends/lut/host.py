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
from ...ir.traits import CALL, QUANTIZED, has_trait, ops_with
from ..base import LegalOps, interpretable_ops
from ..files import target_files
from .decompose import qlinear_reason
from .program import INDEX_FILE, LayerEntry

# (entry, x [m, in] float32, out [m, out] float32 or None) -> y [m, out]
LayerRunner = Callable[[LayerEntry, np.ndarray, "np.ndarray | None"], np.ndarray]

HOST_CHOICES = ("auto", "tvm-llvm", "reference")
PORTABLE_MCPU = "x86-64-v3"   # host kernels as portable as lutexec.so's AVX2 build
# The default, as tvm-llvm's: this machine's CPU (AVX-512 engine and znver4 host kernels on a Zen 4).
# The artifact records what it needs and is refused, naming the fix, on a CPU without it;
# mcpu=PORTABLE_MCPU gives artifacts that run on every AVX2 machine.
DEFAULT_MCPU = "host"
FILE_PREFIX = "host/"


def tvm_available() -> bool:
    return importlib.util.find_spec("tvm") is not None


class ReferenceHost:
    name = "reference-interpreter"
    parallel_launcher = None  # the engine uses its own thread pool

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
        engine = functools.partial(self._qlinear, function)
        return run_function(self.module, function, args, overrides={"qlinear": engine, "bcq_linear": engine})

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
    """Extern step name of the ``index``-th layer of the LUT program (the order program.json keeps)."""
    return f"lut/{index}"


class TVMHost:
    """tvm-llvm plans (the tvm backend's host interface) whose qlinear steps are extern calls
    ``fn(x2, [bias], out)`` into the engine."""

    name = "tvm-llvm"

    def __init__(self, module: Module, layers: Mapping[tuple[str, str], LayerEntry], run_layer: LayerRunner,
                 program: Any, threads: int) -> None:
        from .native import tvm_parallel_launcher
        self.parallel_launcher = tvm_parallel_launcher()
        self.program, self.threads = program, threads
        engine = {_extern_name(i): _engine_step(run_layer, e, threads, self.parallel_launcher)
                  for i, e in enumerate(layers.values())}
        self.executors = program.executors(module, engine, what="LUT program")
        self.externs = len({n for names in program.extern_names().values() for n in names})

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        from ..tvm.host_interface import set_threads
        if function not in self.executors:
            raise BitsmithError(f"no compiled function {function!r}; have {sorted(self.executors)}")
        set_threads(self.threads)
        ex = self.executors[function]
        return ex.run_python(args) if self.python_steps and hasattr(ex, "run_python") else ex.run(args)

    python_steps = False  # True: host kernels and engine called one by one from Python (comparisons)

    def kv_session(self) -> Any:
        from ..tvm.llvm_target import kv_session
        return kv_session(self.executors, self.run)

    def files(self) -> dict[str, bytes]:
        return {FILE_PREFIX + k: v for k, v in self.program.files().items()}

    def native_files(self) -> dict[str, Any]:
        return {FILE_PREFIX + k: v for k, v in self.program.native_files().items()}

    def report(self) -> dict[str, Any]:
        info = self.program.info
        keep = ("compile_seconds", "cache_hits", "cache_misses", "kernel_compile_seconds", "mcpu", "load_seconds",
                "kernel_schedules", "kv_dtype")
        from ..tvm.llvm_target import step_executor_name
        return {"host": self.name, "host_kernels": self.program.kernel_count, "host_engine_calls": self.externs,
                "host_executor": step_executor_name(self.executors, self.python_steps),
                "host_kv_cache": info.get("kv_cache", "concat"),
                "host_prefill_logits": info.get("prefill_logits", "every position"),
                "engine_threads": "TVM thread pool" if self.parallel_launcher else "engine thread pool",
                **{f"host_{k}": info[k] for k in keep if k in info}}

    @classmethod
    def build(cls, module, layers, run_layer, options) -> "TVMHost":
        from ..tvm.host_interface import compile_host
        externs = {key: _extern_name(i) for i, key in enumerate(layers)}
        program = compile_host(module, externs, mcpu=options.get("mcpu", DEFAULT_MCPU),
                               threads=options.get("threads", 0), kv_dtype=options.get("kv_dtype", "float32"))
        return cls(module, layers, run_layer, program, options.get("threads", 0))

    @classmethod
    def load(cls, module, layers, run_layer, options, files) -> "TVMHost":
        from ..tvm.host_interface import load_host
        return cls(module, layers, run_layer, load_host(target_files(files).under(FILE_PREFIX)),
                   options.get("threads", 0))


def _engine_step(run_layer: LayerRunner, entry: LayerEntry, threads: int, launcher: int | None) -> Callable:
    """The extern step of one layer: a C entry point for the step driver where the engine runs
    natively (``native_step``), with the Python call as its fallback. ``run_layer`` is
    LUTExecutable.run_layer; its executable holds the engine (``fast``) and table kind."""
    from .native_step import native_extern
    fallback = functools.partial(_call_layer, run_layer, entry)
    owner = getattr(run_layer, "__self__", None)
    ext = native_extern(getattr(owner, "fast", None), entry, getattr(owner, "int8", True), threads, launcher,
                        fallback, getattr(owner, "activation_bits", 32)) if owner is not None else None
    return ext if ext is not None else fallback


def _call_layer(run_layer: LayerRunner, entry: LayerEntry, x2: np.ndarray, *rest: np.ndarray) -> None:
    out = rest[-1]
    run_layer(entry, x2, out)
    if len(rest) == 2:  # bias
        out += rest[0]


HOSTS: dict[str, type] = {ReferenceHost.name: ReferenceHost, TVMHost.name: TVMHost}


def _engine_reason(node: Node) -> str | None:
    """Why the engine cannot run a quantized node (None: it can; else the host would run it)."""
    if node.op == "bcq_linear":
        from .codegen_bcq import bcq_reason
        return bcq_reason(node.attr_dict)
    return qlinear_reason(node.attr_dict) if has_trait(node.op, QUANTIZED) else None


def legal_ops(choice: str) -> LegalOps:
    """What a build with host ``choice`` accepts: the tvm-llvm lowering's ops when that host is
    required, else the interpreter's (the fallback under "auto"); never ``call``. Quantized
    ops only within the engine's limits (``decompose.qlinear_reason``)."""
    check_choice(choice)
    if choice == "tvm-llvm":
        from ..tvm.host_interface import legal_ops as tvm_legal_ops
        tvm = tvm_legal_ops()
        return LegalOps(tvm.ops, lambda node: _engine_reason(node) or (tvm.check(node) if tvm.check else None))
    return LegalOps(interpretable_ops() - ops_with(CALL), _engine_reason)


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
    kv = options.get("kv_dtype", "float32")
    if choice == "auto" and not tvm_available():
        _no_kv_dtype(kv, "apache-tvm is not installed")
        return ReferenceHost(module, layers, run_layer, note="apache-tvm is not installed")
    try:
        return TVMHost.build(module, layers, run_layer, options)
    except (ImportError, UnsupportedOpError) as e:
        if choice == "tvm-llvm":
            raise
        _no_kv_dtype(kv, f"tvm-llvm host unavailable: {e}")
        return ReferenceHost(module, layers, run_layer, note=f"tvm-llvm host unavailable: {e}")


def _no_kv_dtype(kv_dtype: str, why: str) -> None:
    """A kv_dtype the reference host would drop is an error, not a silent no-op."""
    if kv_dtype != "float32":
        raise OptionError(f"lut-cpu kv_dtype={kv_dtype!r} is the tvm-llvm host's in-place KV cache, and this "
                          f"build falls back to the reference host ({why})")


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
