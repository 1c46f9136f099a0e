"""The tvm backend's public host interface: tvm-llvm plans that call another backend's engine.

A backend with its own engine for linear layers (lut-cpu runs every qlinear on its LUT engine)
can run the rest of a module as tvm-llvm kernels through this module, and through nothing
else of the tvm backend (docs/tvm-backend.md, "Host interface"):

* ``compile_host(module, externs, mcpu=..., threads=...)`` lowers and compiles the module with
  each node named in ``externs`` (a LINEAR_LIKE node, keyed by (function, output value)) as an
  *extern step* ``name``: at run time the plan calls ``fn(x2, [bias,] out)`` with x viewed as
  [m, in] float32, the node's bias when it has one, and out [m, out] to fill;
* ``load_host(files)`` reads such a host back from an artifact's files (its ``files()``);
* ``HostProgram.executors(module, engine)`` binds the extern steps to callables by name; a
  plan that calls a name ``engine`` lacks raises ArtifactError naming the plan file;
* ``legal_ops()`` and ``set_threads`` as the tvm-llvm target has them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...ir import Module, Node
from ..base import LegalOps

ExternFn = Callable[..., None]  # fn(x2, [bias,] out): writes out


@dataclass
class HostProgram:
    """Compiled (or loaded) tvm-llvm plans of every function of a module, with extern steps."""

    build: Any          # llvm_target.HostBuild
    libdir: Any = None  # runtime_cpu.LibraryDir of a loaded host: kept alive with the kernels

    @property
    def info(self) -> dict[str, Any]:
        """The host's compile/load facts (as tvm-llvm's report() has them)."""
        return self.build.info

    @property
    def kernel_count(self) -> int:
        return len(self.build.libraries)

    def extern_names(self) -> dict[str, list[str]]:
        """Per function, the extern step names its plan calls, in step order."""
        from .plan import EXTERN_PREFIX
        return {name: [s.kernel[len(EXTERN_PREFIX):] for s in plan.steps
                       if getattr(s, "kernel", "").startswith(EXTERN_PREFIX)]
                for name, plan in self.build.plans.items()}

    def executors(self, module: Module, engine: Mapping[str, ExternFn], what: str = "engine") -> dict[str, Any]:
        """A plan executor per function (``run(args) -> outputs``), extern steps calling
        ``engine[name]``; a name missing from ``engine`` raises ArtifactError naming the plan."""
        from .plan import EXTERN_PREFIX, PlanError
        for function, names in self.extern_names().items():
            for name in names:
                if name not in engine:
                    raise PlanError(self.build.plan_file,
                                    f"functions[{function!r}]: calls {EXTERN_PREFIX}{name}, which has no {what} "
                                    f"({len(engine)} known)"[:200])
        return self.build.executors(module, {EXTERN_PREFIX + k: fn for k, fn in engine.items()})

    def files(self) -> dict[str, bytes]:
        return self.build.files()

    def native_files(self) -> dict[str, Any]:
        return self.build.native_files()


def compile_host(module: Module, externs: Mapping[tuple[str, str], str], *, mcpu: str,
                 threads: int, kv_dtype: str = "float32") -> HostProgram:
    """tvm-llvm kernels for ``module`` with the ``externs`` nodes as extern steps (module doc).
    A node that cannot be one (not float32 activations) raises UnsupportedOpError. ``kv_dtype``:
    the in-place KV cache's type (tvm-llvm's option)."""
    from . import llvm_target
    from .anchor_rules import finish_out, flatten_in, matmul_out
    from .plan import checked_kernel_key, EXTERN_PREFIX

    for name in externs.values():
        checked_kernel_key(EXTERN_PREFIX + name)  # a name the plan format can store

    def extern_rule(builtin: Callable, node: Node, ctx: Any) -> None:
        name = externs.get((ctx.fn.name, node.outputs[0].name))
        if name is None:
            return builtin(node, ctx)
        if ctx.types[node.inputs[0]].dtype != "float32":
            raise ctx.unsupported(node, "an extern step takes float32 activations")
        x2, lead = flatten_in(node, ctx)
        out = matmul_out(node, ctx, lead)
        bias = [ctx.slot(node.inputs[-1])] if node.attr("bias") else []
        ctx.extern_call(name, [x2] + bias, [out])
        finish_out(node, ctx, out[0])

    from ...errors import UnsupportedOpError
    from ...ir.traits import LINEAR_LIKE, has_trait
    from .anchor_rules import ANCHOR_RULES
    ops = set()
    for fn in module.functions:
        for n in fn.nodes:
            if (fn.name, n.outputs[0].name) in externs:
                if not has_trait(n.op, LINEAR_LIKE) or n.op not in ANCHOR_RULES:
                    raise UnsupportedOpError.at(n, target=llvm_target.TARGET, function=fn.name,
                                                detail="only linear-like nodes can be extern steps")
                ops.add(n.op)
    rules = {op: functools.partial(extern_rule, ANCHOR_RULES[op]) for op in ops}
    return HostProgram(llvm_target.compile_host(module, {"mcpu": mcpu, "threads": threads, "kv_dtype": kv_dtype},
                                                anchor_rules=rules))


def load_host(files: Mapping[str, bytes]) -> HostProgram:
    """The host stored by ``HostProgram.files()``; nothing is compiled (see ``llvm_target.load_host``)."""
    from . import llvm_target
    build, libdir = llvm_target.load_host(files)
    return HostProgram(build, libdir)


def legal_ops() -> LegalOps:
    """What the tvm-llvm lowering accepts (``lowering.legal_ops``)."""
    from .lowering import legal_ops as lowering_legal_ops
    return lowering_legal_ops()


def set_threads(threads: int) -> None:
    """TVM's CPU thread pool size for the calling thread's next runs (0: every core)."""
    from . import runtime_cpu
    runtime_cpu.set_threads(threads)
