"""The user-facing MLIR entry points: ``export_mlir``, ``import_mlir`` and ``run_mlir``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..ir import Module
from .options import ExportOptions


def export_mlir(source: Any, out: str | os.PathLike[str] | None = None, *, inline_weights: bool = False,
                attention: str = "bitsmith", inline_max_elements: int = 1,
                progress: Callable[[str], None] | None = None, **compile_options: Any) -> str:
    """MLIR text (func/arith/math/linalg/tensor, ``bitsmith.*`` generic ops, ml_program
    globals for weights) for ``source``: a ``Module``, a ``CompiledModel``, a saved artifact
    directory, or a model that ``bitsmith.compile`` takes (compiled for the reference target
    with ``compile_options``, e.g. ``quant="bitmod-w4"``). MLIR's parser and verifier have
    accepted the text. Written to ``out`` too when given. See docs/mlir.md."""
    from .export import export_module
    module = source if isinstance(source, Module) else _module(source, progress, compile_options)
    text = export_module(module, ExportOptions(inline_weights=inline_weights, inline_max_elements=inline_max_elements, attention=attention))
    if out is not None:
        Path(out).write_text(text, encoding="utf-8")
    return text


def _module(source: Any, progress: Callable[[str], None] | None, options: dict) -> Module:
    from .sources import module_of
    return module_of(source, progress, **options)


def import_mlir(source: str | os.PathLike[str], tensors: Mapping[str, np.ndarray] | str | os.PathLike[str] | None = None):
    """Reads an MLIR file written by ``export_mlir`` back into an ``ImportedModule``
    (``.module``, equal to the exported one, and ``.missing``: external constants whose data
    neither the file nor ``tensors`` held). ``tensors``: a mapping, an artifact directory or
    a .safetensors file; each tensor used is checked against the file's sha256."""
    from .importer import import_module
    from .sources import tensors_from
    return import_module(Path(source).read_text(encoding="utf-8"), tensors_from(tensors))


def run_mlir(module: Module, args: Sequence[np.ndarray], function: str = "main", opt_level: int = 2) -> list[np.ndarray]:
    """Runs ``function`` of ``module`` through MLIR: exported with inline weights and linalg
    attention, lowered to LLVM, JIT-compiled by the ExecutionEngine at LLVM ``opt_level``
    (static shapes only)."""
    from .execution import MLIRProgram
    from .export import export_module
    text = export_module(module, ExportOptions(inline_weights=True, attention="linalg"))
    return MLIRProgram(text, opt_level).run(function, args)
