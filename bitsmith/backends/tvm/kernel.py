"""The unit the tvm backend compiles: one unscheduled TIR function and a schedule hint.

Lowering rules (one per IR op or fused op group) produce a KernelDef; a per-target
scheduler turns it into a scheduled IRModule; the kernel cache keys compiled code by the
definition's text, the schedule, the target and the TVM version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .cuda_scratch import ScratchSpec


@dataclass(frozen=True)
class KernelDef:
    """``func`` is unscheduled (as ``te.create_prim_func`` makes it); its parameters are the
    kernel's inputs followed by its outputs, and dims that vary at run time are ``tir.Var``s.
    ``kind`` tells the scheduler what it is: "injective", "reduce", "gemv" (dense linear),
    "qgemv" (quantized linear), "attention", ... ."""

    name: str
    func: Any  # tvm.tir.PrimFunc, or an IRModule of functions scheduled by hand
    kind: str
    scratch: tuple[ScratchSpec, ...] = ()  # parameters the runtime allocates (a hand-scheduled kernel's)

    def text(self) -> str:
        return self.func.script()

    def digest(self) -> str:
        extra = "".join(f"\n{sorted(s.to_json().items())}" for s in self.scratch)
        return hashlib.sha256(f"{self.kind}\n{self.text()}{extra}".encode()).hexdigest()
