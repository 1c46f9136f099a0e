"""Backend ``lut``: target lut-cpu, quantized linear layers by table lookup (T-MAC style).

Every qlinear becomes an instruction stream for the LUT engine (docs/lut-isa.md) with its
weights re-laid-out as bit-plane words; a C executor built at compile time (AVX2) runs the
streams, and everything else (attention, norms, activations, dense linears such as lm_head)
runs on the host path (``host.py``: tvm-llvm kernels, or the reference interpreter), which
calls the engine for each qlinear.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError, OptionError, UnsupportedOpError
from ...ir import Module
from ...tolerance import Tolerance
from ..base import Backend, Executable, LegalOps, Pipeline
from ..files import target_files
from . import host, native, program
from . import reference_executor
from .codegen import generate
from .codegen_bcq import generate_bcq
from .decompose import TARGET, decompose
from .program import LayerEntry

TABLE_KINDS = ("int8", "fp32")
EXECUTORS = ("auto", "fast", "reference")
ACTIVATION_BITS = (32, 8)
KV_DTYPES = ("float32", "float16")  # the tvm-llvm host's option (backends/tvm/llvm_target.py)


class LUTOptionError(OptionError):
    pass


def _check_options(options: Mapping[str, Any]) -> tuple[bool, int, str]:
    missing = [k for k in ("lut_tables", "threads", "lut_executor", "lut_table_group") if k not in options]
    if missing:
        raise LUTOptionError(f"options {missing} are missing (an artifact stores every lut-cpu option)")
    tables, threads, executor = options["lut_tables"], options["threads"], options["lut_executor"]
    tg = options["lut_table_group"]
    if isinstance(tg, bool) or not isinstance(tg, int) or tg % 4 or not 4 <= tg <= 256:
        raise LUTOptionError(f"lut_table_group (activations per int8 table scale) must be a multiple of 4 "
                             f"in [4, 256], got {tg!r}")
    if tables not in TABLE_KINDS:
        raise LUTOptionError(f"lut_tables must be one of {TABLE_KINDS}, got {tables!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise LUTOptionError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    if executor not in EXECUTORS:
        raise LUTOptionError(f"lut_executor must be one of {EXECUTORS}, got {executor!r}")
    host.check_choice(options.get("lut_host", "auto"))
    abits = options.get("activation_bits", 32)  # artifacts from before the option: float activations
    if isinstance(abits, bool) or abits not in ACTIVATION_BITS:
        raise LUTOptionError(f"activation_bits must be one of {ACTIVATION_BITS} (8: activations quantized to int8 "
                             f"per table block, integer dot products; 32: float activations), got {abits!r}")
    if abits == 8 and tables != "int8":
        raise LUTOptionError("activation_bits=8 computes exact integer tables of int8 activations; it needs "
                             f"lut_tables='int8', got {tables!r}")
    kv = options.get("kv_dtype", "float32")  # artifacts from before the option: float32 caches
    if kv not in KV_DTYPES:
        raise LUTOptionError(f"kv_dtype must be one of {KV_DTYPES} (the tvm-llvm host's in-place KV cache; float16 "
                             f"halves what attention reads), got {kv!r}")
    if kv != "float32" and options.get("lut_host", "auto") == "reference":
        raise LUTOptionError(f"kv_dtype={kv!r} is the tvm-llvm host's in-place KV cache; lut_host='reference' has none")
    return tables == "int8", threads, executor


ENGINE_OPS = ("qlinear", "bcq_linear")   # the ops the engine runs (each becomes one stream)


def lower_module(module: Module, table_group: int = 32) -> list[LayerEntry]:
    """Code generation: one LayerEntry per qlinear or bcq_linear node of every function."""
    out = []
    for fn, node, constants in engine_nodes(module):
        if node.op == "bcq_linear":
            out.append(_lower_bcq(module, fn, node, constants, table_group))
            continue
        attrs = node.attr_dict
        n_weight = len(node.inputs) - 1 - (1 if attrs["bias"] else 0)
        names = [constants.get(v) for v in node.inputs[1:1 + n_weight]]
        where = node.loc.module_path if node.loc is not None else ""
        if None in names:
            raise UnsupportedOpError("qlinear", module_path=where, target=TARGET,
                                     detail="weight operands must be constants")
        weight = decompose(attrs, [module.tensors[n] for n in names], where)
        layer = names[0].rsplit(".codes", 1)[0]
        out.append(LayerEntry(fn.name, node.outputs[0].name, layer, attrs["scheme"], generate(weight, table_group)))
    return out


def engine_nodes(module: Module):
    """(function, node, constants) of every node the engine runs, in node order."""
    for fn in module.functions:
        constants = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
        for node in fn.nodes:
            if node.op in ENGINE_OPS:
                yield fn, node, constants


def _lower_bcq(module: Module, fn, node, constants, table_group: int) -> LayerEntry:
    attrs = node.attr_dict
    from ...ir.bcq import has_offset
    names = [constants.get(v) for v in node.inputs[1:4 if has_offset(attrs) else 3]]
    where = node.loc.module_path if node.loc is not None else ""
    if None in names:
        raise UnsupportedOpError("bcq_linear", module_path=where, target=TARGET,
                                 detail="weight operands must be constants")
    from ...ir.bcq import quant_label
    try:
        prog = generate_bcq(attrs, [module.tensors[n] for n in names], table_group)
    except ValueError as e:
        raise UnsupportedOpError("bcq_linear", module_path=where, target=TARGET, detail=str(e)) from None
    return LayerEntry(fn.name, node.outputs[0].name, names[0].rsplit(".planes", 1)[0], quant_label(attrs), prog)


class LUTExecutable(Executable):
    """Thread-safe without a lock: the host path is a tvm-llvm PlanExecutor (per-thread
    buffers, see tvm/executor.py) or the reference interpreter (per-call values); the C engine
    allocates its tables and accumulators per call and only reads the validated program, whose
    plan cache is filled once per layer (a race re-validates, never corrupts); parallel parts
    run on the calling thread's TVM pool or the engine's own pool (one call at a time; an
    overlapping call runs on its caller's thread alone, with the same result)."""

    def __init__(self, module: Module, layers: list[LayerEntry], library: bytes, options: Mapping[str, Any],
                 host_factory: Callable[[Mapping[tuple[str, str], LayerEntry], host.LayerRunner], Any],
                 isa: str = native.PORTABLE_ISA) -> None:
        """``host_factory(layers, run_layer)`` makes the host path (host.py) around the engine;
        ``isa``: which build of the engine ``library`` is (native.ENGINE_ISAS)."""
        self.module = module
        self.layers = {(e.function, e.value): e for e in layers}
        self.library = library
        self.isa = isa
        self.int8, self.threads, choice = _check_options(options)
        self.table_group = options["lut_table_group"]
        self.activation_bits = options.get("activation_bits", 32)
        self.fast = None
        if choice != "reference":
            self.fast = native.load_library(library, isa)
            if self.fast is None and choice == "fast":
                raise BitsmithError("lut_executor='fast' needs a CPU with AVX2 and FMA; this one has neither "
                                    "(use lut_executor='auto' to fall back to the reference executor)")
        if self.fast is not None:
            self.executor = f"native C ({isa.upper().replace('AVX512', 'AVX-512')}, lut/lutexec.so)"
        elif choice == "reference":
            self.executor = "reference (python, chosen by lut_executor)"
        else:
            self.executor = "reference (python; this CPU lacks AVX2/FMA)"
        self._stats = program.stream_stats(layers)
        self.host = host_factory(self.layers, self.run_layer)
        self.launcher = self.host.parallel_launcher  # the engine shares the host's thread pool where it has one

    def run_layer(self, entry: LayerEntry, x2: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """y [m, out] for x2 [m, in] float32 (C-contiguous), written into ``out`` when given."""
        if self.fast is not None:
            return self.fast.run(entry.program, x2, self.int8, self.threads, out=out, launcher=self.launcher,
                                 activation_bits=self.activation_bits)
        y = reference_executor.run(entry.program, x2, self.int8, self.activation_bits)
        if out is None:
            return y
        out[...] = y
        return out

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.host.run(function, args)

    def kv_session(self) -> Any:
        """The tvm-llvm host's in-place KV session (None on the reference host or an older artifact)."""
        return getattr(self.host, "kv_session", lambda: None)()

    def native_files(self) -> dict[str, Any]:
        return {native.LIBRARY_FILE: native.ENGINE_ISAS[self.isa].spec, **self.host.native_files()}

    def files(self) -> dict[str, bytes]:
        layers = list(self.layers.values())
        extra = {"library_file": native.LIBRARY_FILE, "isa": self.isa, "cflags": list(native.ENGINE_ISAS[self.isa].cflags)}
        return {native.LIBRARY_FILE: self.library, **program.to_files(layers, self.host.name, extra),
                **self.host.files()}

    def report(self) -> dict[str, Any]:
        return {"executor": self.executor, "lut_isa": self.isa, **self.host.report(), "lut_tables": "int8" if self.int8 else "fp32",
                "lut_table_group": self.table_group, "activation_bits": self.activation_bits, "threads": self.threads,
                "streams": self._stats}


class LUTBackend(Backend):
    name = "lut"
    targets = ("lut-cpu",)

    def option_defaults(self, target: str) -> dict[str, Any]:
        return {"lut_tables": "int8", "lut_table_group": 32, "threads": 0, "lut_executor": "auto",
                "lut_host": "auto", "mcpu": host.DEFAULT_MCPU, "activation_bits": 32, "kv_dtype": "float32"}

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        """fp32 tables: float32 sums in another order (tests/test_lut_backend.py: 1e-5).
        int8 tables round each 32-activation block to 1/254 of its largest entry: measured
        1.45% of max|logit| on tiny Llama (tests/test_lut_backend.py); 3% is a 2x margin, and a
        wrong plane weight, scale or table index moves logits by O(max|logit|)."""
        from ..tvm import TVMBackend
        host = TVMBackend().tolerance("tvm-llvm", {})  # the host path's float32 bound, one source
        if options.get("lut_tables", "int8") == "int8":
            return Tolerance(rtol=host.rtol, atol=host.atol, scale_rtol=0.03)
        return host

    def pipeline(self, target: str, options: Mapping[str, Any]) -> Pipeline:
        """Calls inlined: the host plans one function at a time; qlinears the engine cannot
        hold exactly (more than 8 bit planes) become dense layers on their exact weights, for the host."""
        from ..scheme_fallback import dequantize_specs
        from ..tvm.qlinear_layout import gather_native  # the host's gather (the interpreter gathers any)
        from .decompose import native_scheme
        return Pipeline(legalize=("inline",) + dequantize_specs(native_scheme, gather_native))

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        """The host path's ops (host.py), qlinear within the engine's limits."""
        return host.legal_ops(options.get("lut_host", "auto"))

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        _check_options(options)
        layers = lower_module(module, options["lut_table_group"])
        isa = native.choose_isa(options.get("mcpu", host.DEFAULT_MCPU))
        return LUTExecutable(module, layers, native.build_library(isa=isa), options,
                             lambda lay, run_layer: host.build_host(options.get("lut_host", "auto"), module, lay,
                                                                    run_layer, options), isa)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        _check_options(options)
        files = target_files(files)
        layers, doc = program.from_files(files)
        if native.LIBRARY_FILE not in files:
            raise ArtifactError(files.path(native.LIBRARY_FILE), "missing from the artifact (needed by target lut-cpu)")
        expected = {(fn.name, n.outputs[0].name) for fn in module.functions for n in fn.nodes if n.op in ENGINE_OPS}
        got = {(e.function, e.value) for e in layers}
        if expected != got:
            raise ArtifactError(files.path(program.INDEX_FILE), "layers: its streams do not match the module's "
                                                                "qlinear and bcq_linear layers")
        if doc["host"] not in host.HOSTS:
            raise ArtifactError(files.path(program.INDEX_FILE), f"host: {str(doc['host'])[:60]!r} is not one of "
                                                                f"{sorted(host.HOSTS)}")
        isa = doc.get("isa", native.PORTABLE_ISA)  # artifacts from before the AVX-512 build: AVX2
        if not isinstance(isa, str) or isa not in native.ENGINE_ISAS:
            raise ArtifactError(files.path(program.INDEX_FILE), f"isa: {str(isa)[:40]!r} is not one of "
                                                                f"{sorted(native.ENGINE_ISAS)}")
        library = files[native.LIBRARY_FILE]
        try:
            exe = LUTExecutable(module, layers, library, options,
                                lambda lay, run_layer: host.load_host(doc["host"], options.get("lut_host", "auto"),
                                                                      module, lay, run_layer, options, files), isa)
        except native.NativeBuildError as e:  # the library disagrees with program.json (isa, ABI): not this artifact's
            raise ArtifactError(files.path(native.LIBRARY_FILE), str(e)) from e
        _validate_streams(exe, layers, files.path(program.INDEX_FILE))
        return exe


def _validate_streams(exe: LUTExecutable, layers: list[LayerEntry], index_file: str) -> None:
    """Every layer's stream through the full validation the executor would run on its first call
    (the C ``lut_plan`` when the fast executor is loaded, whose verdict it caches, else
    ``validate.check_program``), so a bad stream is refused at load, naming its field."""
    from . import isa
    from .validate import StreamError, check_program
    for i, entry in enumerate(layers):
        try:
            if exe.fast is not None:
                exe.fast.plan(entry.program)
            else:
                check_program(entry.program)
        except (isa.ISAError, StreamError) as e:
            raise ArtifactError(index_file, f"layers[{i}].stream: {e}"[:300]) from None
