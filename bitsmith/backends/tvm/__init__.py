"""Backend ``tvm``: targets tvm-llvm (CPU) and tvm-cuda (GPU).

Every target-specific decision is delegated to the registry in ``targets.py``; see
docs/tvm-backend.md for the lowering, fusion, executor and cache design.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...ir import Module
from ..base import Backend, Executable, LegalOps, Pipeline


class TVMBackend(Backend):
    name = "tvm"
    targets = ("tvm-llvm", "tvm-cuda")

    def option_defaults(self, target: str) -> dict[str, Any]:
        from .targets import get_target
        return get_target(target).option_defaults()

    def pipeline(self, target: str, options: Mapping[str, Any]) -> Pipeline:
        from .targets import get_target
        return get_target(target).pipeline(options)

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        """What the lowering has rules for (the same on every tvm target; no ``call``)."""
        from .lowering import legal_ops
        return legal_ops()

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        from .targets import get_target
        return get_target(target).build(module, options)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        from .targets import get_target
        return get_target(target).load(module, options, files)
