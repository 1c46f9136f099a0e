"""MLIR interop through the upstream MLIR Python bindings (package torch-mlir, extra ``mlir``).

Importing this package does not import the bindings; the first export, import or run does.
Modules: ``types`` (tensor types), ``emitter`` (text builder), ``elementwise``/``structured``/
``movement`` (standard ops), ``dialect_ops`` (``bitsmith.*`` generic ops, calls),
``constants``, ``tags`` (how nodes are marked), ``export``, ``importer``, ``execution``
(lowering and the ExecutionEngine), ``sources`` (artifacts, weights), ``command`` (CLI).
"""

from .bindings import MLIRInteropError, MLIRUnavailableError
from .interop import export_mlir, import_mlir, run_mlir
from .options import ExportOptions

__all__ = ["ExportOptions", "MLIRInteropError", "MLIRUnavailableError", "export_mlir", "import_mlir", "run_mlir"]
