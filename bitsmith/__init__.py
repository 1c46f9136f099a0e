"""bitsmith: a compiler for running large language models on accelerators."""

from .api import CompileConfig, compile, load
from .mlir import export_mlir, import_mlir
from .errors import (ArtifactError, BitsmithError, ModelLoadError, PassError, PluginError,
                     UnknownOptionError, UnknownTargetError, UnsupportedOpError)
from .runtime import CompiledModel
from .version import __version__

__all__ = [
    "ArtifactError", "BitsmithError", "CompileConfig", "CompiledModel", "ModelLoadError", "PassError",
    "PluginError", "UnknownOptionError", "UnknownTargetError", "UnsupportedOpError", "__version__",
    "compile", "export_mlir", "import_mlir", "load",
]
