"""Backend ``lut``: target lut-cpu, quantized linear layers by table lookup (T-MAC style).

Every qlinear becomes an instruction stream for the LUT engine (docs/lut-isa.md) with its
weights re-laid-out as bit-plane words; a C executor built at compile time (AVX2) runs the
streams, and everything else (attention, norms, activations, dense linears such as lm_head)
runs on the host path, the reference interpreter, with qlinear swapped for the engine.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError, UnsupportedOpError
from ...ir import Module, Node, run_function
from ...ir.quantized import qlinear_nodes
from ..base import Backend, Executable
from . import native, program
from . import reference_executor
from .codegen import generate
from .decompose import TARGET, decompose
from .program import LayerEntry

TABLE_KINDS = ("int8", "fp32")
EXECUTORS = ("auto", "fast", "reference")


class LUTOptionError(BitsmithError, ValueError):
    pass


def _check_options(options: Mapping[str, Any]) -> tuple[bool, int, str]:
    tables, threads, executor = options["lut_tables"], options["threads"], options["lut_executor"]
    tg = options["lut_table_group"]
    if not isinstance(tg, int) or tg % 4 or not 4 <= tg <= 256:
        raise LUTOptionError(f"lut_table_group (activations per int8 table scale) must be a multiple of 4 "
                             f"in [4, 256], got {tg!r}")
    if tables not in TABLE_KINDS:
        raise LUTOptionError(f"lut_tables must be one of {TABLE_KINDS}, got {tables!r}")
    if not isinstance(threads, int) or threads < 0:
        raise LUTOptionError(f"threads must be an int >= 0 (0 = all cores), got {threads!r}")
    if executor not in EXECUTORS:
        raise LUTOptionError(f"lut_executor must be one of {EXECUTORS}, got {executor!r}")
    return tables == "int8", threads, executor


def lower_module(module: Module, table_group: int = 32) -> list[LayerEntry]:
    """Code generation: one LayerEntry per qlinear node of every function."""
    out = []
    for fn, node, constants in qlinear_nodes(module):
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


class LUTExecutable(Executable):
    def __init__(self, module: Module, layers: list[LayerEntry], library: bytes, options: Mapping[str, Any]) -> None:
        self.module = module
        self.layers = {(e.function, e.value): e for e in layers}
        self.library = library
        self.int8, self.threads, choice = _check_options(options)
        self.table_group = options["lut_table_group"]
        self.fast = None
        if choice != "reference":
            self.fast = native.load_library(library)
            if self.fast is None and choice == "fast":
                raise BitsmithError("lut_executor='fast' needs a CPU with AVX2 and FMA; this one has neither "
                                    "(use lut_executor='auto' to fall back to the reference executor)")
        if self.fast is not None:
            self.executor = "native C (AVX2, lut/lutexec.so)"
        elif choice == "reference":
            self.executor = "reference (python, chosen by lut_executor)"
        else:
            self.executor = "reference (python; this CPU lacks AVX2/FMA)"
        self._stats = program.stream_stats(layers)

    def run_layer(self, entry: LayerEntry, x: np.ndarray) -> np.ndarray:
        x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
        if self.fast is not None:
            return self.fast.run(entry.program, x2, self.int8, self.threads)
        return reference_executor.run(entry.program, x2, self.int8)

    def _qlinear(self, function: str, xs: Sequence[np.ndarray], node: Node, ctx: Any) -> list[np.ndarray]:
        entry = self.layers.get((function, node.outputs[0].name))
        if entry is None:
            raise BitsmithError(f"no LUT program for qlinear %{node.outputs[0].name} in {function}")
        x = xs[0]
        y = self.run_layer(entry, x).reshape(x.shape[:-1] + (-1,))
        if node.attr("bias"):
            y = y + xs[-1]
        return [y.astype(x.dtype, copy=False)]

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_function(self.module, function, args,
                            overrides={"qlinear": functools.partial(self._qlinear, function)})

    def files(self) -> dict[str, bytes]:
        layers = list(self.layers.values())
        extra = {"library_file": native.LIBRARY_FILE, "cflags": list(native.CFLAGS)}
        return {native.LIBRARY_FILE: self.library, **program.to_files(layers, extra)}

    def report(self) -> dict[str, Any]:
        return {"executor": self.executor, "host": program.HOST_PATH, "lut_tables": "int8" if self.int8 else "fp32",
                "lut_table_group": self.table_group,
                "threads": self.threads, "streams": self._stats}


class LUTBackend(Backend):
    name = "lut"
    targets = ("lut-cpu",)

    def option_defaults(self, target: str) -> dict[str, Any]:
        return {"lut_tables": "int8", "lut_table_group": 32, "threads": 0, "lut_executor": "auto"}

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        _check_options(options)
        layers = lower_module(module, options["lut_table_group"])
        return LUTExecutable(module, layers, native.build_library(), options)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        _check_options(options)
        layers, _ = program.from_files(files)
        if native.LIBRARY_FILE not in files:
            raise ArtifactError(f"target/{native.LIBRARY_FILE}", "missing from the artifact (needed by target lut-cpu)")
        expected = {(fn.name, n.outputs[0].name) for fn in module.functions for n in fn.nodes if n.op == "qlinear"}
        got = {(e.function, e.value) for e in layers}
        if expected != got:
            raise ArtifactError(f"target/{program.INDEX_FILE}", "its streams do not match the module's qlinear layers")
        return LUTExecutable(module, layers, files[native.LIBRARY_FILE], options)
