"""Calibration runners on compiled targets (``bitsmith.passes.quantization.calibration.CalibrationRunner``).

The calibration passes need the activations of the model they rewrite; running them through
the reference interpreter (float64 accumulation, one numpy call per op) is the slow part of
GPTQ calibration. The API builds a faster runner instead and hands it to the passes, which
import no backend: ``calib_target="auto"`` builds a :class:`BackendRunner` on tvm-llvm where
TVM is installed (measured fastest, benchmarks/results/calibration_speed.md), else the float32
BLAS interpreter ``numpy-fp32`` (``float32_blas``); a target name builds a BackendRunner on
that target; ``reference`` is the reference interpreter.
"""

from __future__ import annotations

import importlib.util

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import UnknownOptionError
from ..ir import Module
from ..passes.quantization.calibration import CalibrationRunner, InterpreterRunner, RunFn
from .base import backend_for_target, check_legal, targets
from .float32_blas import Float32BlasRunner

REFERENCE = "reference"
FLOAT32_BLAS = Float32BlasRunner.name  # "numpy-fp32"
# ``auto``: the first of these whose module is installed (numpy always is)
FAST_CPU_TARGETS: tuple[tuple[str, str], ...] = (("tvm-llvm", "tvm"), (FLOAT32_BLAS, "numpy"))


@dataclass(frozen=True)
class BackendRunner:
    """Builds each module it is given for ``target`` (the backend's own pipeline, then ``build``)
    and runs its ``main``. Kernels come from the backend's cache, so a rebuild of the same shapes
    (every decoder layer's segment in sequential calibration) compiles nothing."""

    target: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target

    def compile(self, module: Module) -> RunFn:
        from ..passes import PassManager, parse_pass_spec
        backend = backend_for_target(self.target)
        options = {**backend.option_defaults(self.target), **self.options}
        passes = [p for spec in ("dce",) + backend.pipeline(self.target, options).specs()
                  for p in parse_pass_spec(spec)]
        module = PassManager(passes).run(module)
        check_legal(module, backend.legal_ops(self.target, options), self.target)
        exe = backend.build(module, self.target, options)
        return lambda args: exe.run("main", list(args))


def check_calib_target(name: str) -> None:
    """``auto``, ``reference``, ``numpy-fp32`` or an installed target; else UnknownOptionError
    listing them."""
    if name in ("auto", REFERENCE, FLOAT32_BLAS):
        return
    known = targets()
    if name not in known:
        raise UnknownOptionError("calibration target (calib_target)", name,
                                 ["auto", FLOAT32_BLAS, *sorted(known)])


def fastest_cpu_target() -> str:
    return next(target for target, needs in FAST_CPU_TARGETS
                if importlib.util.find_spec(needs) is not None and target in (FLOAT32_BLAS, *targets()))


def calibration_runner(name: str = "auto") -> CalibrationRunner:
    """The runner for ``calib_target``: ``auto`` = :func:`fastest_cpu_target`."""
    check_calib_target(name)
    target = fastest_cpu_target() if name == "auto" else name
    if target == REFERENCE:
        return InterpreterRunner()
    if target == FLOAT32_BLAS:
        return Float32BlasRunner()
    return BackendRunner(target)
