"""Registry of the tvm backend's targets: target name -> TargetSpec.

``TVMBackend`` delegates every target-specific decision here, so adding a target is one
``register_target`` call in the target's own module (no if-chains over target names).

A TargetSpec says:
  * ``option_defaults()``: the compile options the target accepts, with defaults
    (``bitsmith.compile(..., target=name, **options)`` validates against these);
  * ``build(module, options) -> Executable``: lower, schedule, compile (through the kernel
    cache) and return a runnable executable whose ``files()`` hold the compiled libraries;
  * ``load(module, options, files) -> Executable``: rebuild the executable from a saved
    artifact's (already sha256-checked) files WITHOUT compiling anything;
  * ``pipeline(options) -> Pipeline``: the passes (by phase) that turn a target-neutral module
    into what ``build`` takes (the artifact stores their result, so ``load`` runs none).

The shared machinery a target builds on: ``lowering.lower_function`` (IR -> fused KernelDefs
and a step plan), ``cache.KernelCache`` (compiled kernels on disk), ``plan.Plan``
(serialisable step list). ``tvm-llvm`` is registered by ``llvm_target``; ``tvm-cuda`` by
``cuda_target`` (imported lazily, only if that module exists).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ...errors import UnknownTargetError
from ...ir import Module
from ..base import Executable, Pipeline

BuildFn = Callable[[Module, Mapping[str, Any]], Executable]
LoadFn = Callable[[Module, Mapping[str, Any], Mapping[str, bytes]], Executable]


def legalize_specs(native: Callable[[Any], bool] | None = None,
                   native_gather: Callable[[Any], bool] | None = None) -> tuple[str, ...]:
    """Calls inlined (kernels are planned per function); qlinears of schemes the kernels lack
    (``native``, default: what every tvm target decodes) become dense layers on their exact weights,
    and tied tables' packed rows (qembedding) that ``native_gather`` lacks (default: all) float tables."""
    from ..scheme_fallback import dequantize_specs
    from .qlinear_layout import native_scheme
    return ("inline",) + dequantize_specs(native or native_scheme, native_gather or (lambda scheme: False))


def inline_only(options: Mapping[str, Any]) -> Pipeline:
    """Kernels are planned per function: calls between functions are inlined first (and
    unsupported weight formats dequantized, see ``legalize_specs``)."""
    return Pipeline(legalize=legalize_specs())


def llvm_pipeline(options: Mapping[str, Any]) -> Pipeline:
    """``inline_only`` with the CPU kernels' wider set of schemes (8-bit codes, affine GGUF grids,
    float offsets: ``qlinear_layout.native_scheme_llvm``)."""
    from .qlinear_layout import gather_native, native_scheme_llvm
    return Pipeline(legalize=legalize_specs(native_scheme_llvm, gather_native))


@dataclass(frozen=True)
class TargetSpec:
    name: str
    option_defaults: Callable[[], dict[str, Any]]
    build: BuildFn
    load: LoadFn
    doc: str = ""
    pipeline: Callable[[Mapping[str, Any]], Pipeline] = inline_only


_TARGETS: dict[str, TargetSpec] = {}

# modules that register targets when imported; a missing optional one is skipped
_TARGET_MODULES = ("bitsmith.backends.tvm.llvm_target", "bitsmith.backends.tvm.cuda_target")
_loaded = False


def register_target(spec: TargetSpec) -> TargetSpec:
    if spec.name in _TARGETS and _TARGETS[spec.name] is not spec:
        raise ValueError(f"tvm target {spec.name!r} registered twice")
    _TARGETS[spec.name] = spec
    return spec


def _load_target_modules() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _TARGET_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def get_target(name: str) -> TargetSpec:
    _load_target_modules()
    if name not in _TARGETS:
        raise UnknownTargetError(name, list(_TARGETS))
    return _TARGETS[name]


def registered_targets() -> dict[str, TargetSpec]:
    _load_target_modules()
    return dict(_TARGETS)
