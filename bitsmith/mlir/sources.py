"""Where a module and its weights come from for MLIR interop: a compiled model, a saved
artifact (read without loading native code or asking for trust: only the manifest's IR and
the weights file, both checked), or a safetensors file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..ir import Module, parse_module, verify_module


def is_artifact_dir(path: Any) -> bool:
    from ..runtime.manifest import MANIFEST
    return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST).is_file()


def artifact_module(path: str | os.PathLike[str]) -> Module:
    """The verified IR module of a saved artifact with its weights (hash-checked)."""
    from ..runtime.artifact import file_entries, read_manifest
    from ..runtime.manifest import WEIGHTS
    from ..runtime.weights_file import read_weights

    root = Path(path)
    manifest = read_manifest(root)
    tensors = read_weights(root, file_entries(manifest)[WEIGHTS], manifest["tensors"])
    return verify_module(parse_module(manifest["ir"], tensors))


def module_of(source: Any, progress: Callable[[str], None] | None = None, **compile_options: Any) -> Module:
    """A Module as is; a CompiledModel's module; an artifact directory's module; anything else
    is compiled for the reference target with ``compile_options`` (quantization flags...)."""
    from ..runtime import CompiledModel

    if isinstance(source, Module):
        return source
    if isinstance(source, CompiledModel):
        return source.module
    if is_artifact_dir(source):
        if compile_options:
            raise ValueError(f"{source} is a saved artifact; compile options ({', '.join(sorted(compile_options))}) "
                             f"apply only to a model")
        return artifact_module(source)
    from ..api import compile as compile_model
    return compile_model(source, target="reference", progress=progress, **compile_options).module


def tensors_from(source: Mapping[str, np.ndarray] | str | os.PathLike[str] | None) -> Mapping[str, np.ndarray] | None:
    """Weights for an import: a mapping, an artifact directory or a .safetensors file."""
    if source is None or isinstance(source, Mapping):
        return source
    if is_artifact_dir(source):
        return artifact_module(source).tensors
    import safetensors.numpy
    return safetensors.numpy.load_file(str(source))
