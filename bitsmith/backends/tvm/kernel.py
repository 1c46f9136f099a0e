"""The unit the tvm backend compiles: one unscheduled TIR function and a schedule hint.

Lowering rules (one per IR op or fused op group) produce a KernelDef; a per-target
scheduler turns it into a scheduled IRModule; the kernel cache keys compiled code by the
definition (its TIR text, or the recipe it is built from, see ``Recipe``), the schedule, the
target and the TVM version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

from .cuda_scratch import ScratchSpec


def canonical_text(value: Any) -> str:
    """An injective text of a literal made of None, bool, int, float, str and tuples of them
    (``repr`` tells these apart: ``1``/``1.0``/``True``/``'1'``, and round-trips floats exactly);
    TypeError for anything else (an array, a dict, an object whose repr may hide state)."""
    if value is None or type(value) in (bool, int, float, str):
        return repr(value)
    if type(value) is tuple:
        return "(" + "".join(canonical_text(v) + "," for v in value) + ")"
    raise TypeError(f"recipe argument {value!r} ({type(value).__name__}) is not a plain literal")


@dataclass(frozen=True)
class Recipe:
    """How to build a kernel's TIR function: ``builder(*args)``, with ``builder`` a module-level
    function and ``args`` plain literals (``canonical_text``). ``spec()`` names both: the kernel
    cache keys a recipe-built kernel by it (with a digest of the backend's source, the schedule,
    the target and TVM) without building the function, so a cache hit never runs TE."""

    builder: Callable[..., Any]
    args: tuple

    def __post_init__(self) -> None:
        if "<locals>" in self.builder.__qualname__ or "<lambda>" in self.builder.__qualname__:
            raise TypeError(f"recipe builder {self.builder.__qualname__} must be a module-level function: a "
                            "closure's captured state would not be part of the kernel key")
        canonical_text(self.args)  # refuse non-literals now, not when keyed

    def spec(self) -> str:
        return f"{self.builder.__module__}.{self.builder.__qualname__}{canonical_text(self.args)}"


@dataclass(frozen=True)
class KernelDef:
    """``source`` is the unscheduled function (as ``te.create_prim_func`` makes it; or an
    IRModule of functions scheduled by hand), or a ``Recipe`` that ``func`` builds on first use.
    Its parameters are the kernel's inputs followed by its outputs, and dims that vary at run
    time are ``tir.Var``s. ``kind`` tells the scheduler what it is: "injective", "reduce",
    "gemv" (dense linear), "qgemv" (quantized linear), "attention", ... ."""

    name: str
    source: Any  # tvm.tir.PrimFunc, an IRModule, or a Recipe
    kind: str
    scratch: tuple[ScratchSpec, ...] = ()  # parameters the runtime allocates (a hand-scheduled kernel's)

    @property
    def func(self) -> Any:
        if not isinstance(self.source, Recipe):
            return self.source
        built = self.__dict__.get("_built")
        if built is None:
            built = self.source.builder(*self.source.args)
            object.__setattr__(self, "_built", built)
        return built

    @property
    def recipe(self) -> Recipe | None:
        return self.source if isinstance(self.source, Recipe) else None

    def text(self) -> str:
        return self.func.script()

    def definition(self) -> str:
        """What identifies the kernel's code: the recipe's spec (no function built) or the TIR text,
        with the kind and scratch parameters."""
        body = f"recipe {self.source.spec()}" if isinstance(self.source, Recipe) else f"tir {self.text()}"
        extra = "".join(f"\n{sorted(s.to_json().items())}" for s in self.scratch)
        return f"{self.kind}\n{body}{extra}"

    def digest(self) -> str:
        return hashlib.sha256(self.definition().encode()).hexdigest()
