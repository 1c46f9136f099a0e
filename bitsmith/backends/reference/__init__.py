"""Backend ``reference``: runs the IR on the numpy reference interpreter (the oracle)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ...ir import Module, run_function
from ...tolerance import Tolerance
from ..base import Backend, Executable, LegalOps, interpretable_ops


class ReferenceExecutable(Executable):
    """Thread-safe without a lock: the interpreter keeps every value of a call in that call's
    own environment and never writes the module or its (read-only) tensors."""

    def __init__(self, module: Module) -> None:
        self.module = module

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return run_function(self.module, function, args)

    def report(self) -> dict[str, Any]:
        return {"executor": "numpy reference interpreter"}


class ReferenceBackend(Backend):
    name = "reference"
    targets = ("reference",)

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        return Tolerance(rtol=0.0, atol=0.0)  # it is the oracle: identical results

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        """Every op the interpreter has a rule for, calls included."""
        return LegalOps(interpretable_ops())

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        return ReferenceExecutable(module)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        return ReferenceExecutable(module)
