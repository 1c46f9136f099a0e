"""Weight formats a backend's kernels lack: run them as dense float32 with exact weights.

A backend names the schemes it implements natively with a predicate; every other registered
scheme joins one ``dequantize{schemes=...}`` pass in its legalize phase (see
``bitsmith/passes/dequantize.py``), so a qlinear of such a scheme becomes a ``linear`` on its
bit-identical float32 weight instead of reaching a kernel that would misread it."""

from __future__ import annotations

from typing import Callable

from ..ir.quant_grids import SCHEMES, Scheme


def dequantize_specs(native: Callable[[Scheme], bool]) -> tuple[str, ...]:
    """The pass specs (zero or one) that dequantize every registered scheme ``native`` rejects."""
    lacking = [name for name, scheme in SCHEMES.items() if not native(scheme)]
    return (f"dequantize{{schemes={'|'.join(lacking)}}}",) if lacking else ()
