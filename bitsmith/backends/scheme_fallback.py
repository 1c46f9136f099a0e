"""Weight formats a backend's kernels lack: run them as dense float32 with exact weights.

A backend names the schemes it implements natively with a predicate; every other registered
scheme joins one ``dequantize{schemes=...}`` pass in its legalize phase (see
``bitsmith/passes/dequantize.py``), so a qlinear of such a scheme becomes a ``linear`` on its
bit-identical float32 weight instead of reaching a kernel that would misread it; a
``qembedding`` (the packed rows of a tied table) likewise becomes an ``embedding`` of the
decoded table unless the backend gathers that scheme itself."""

from __future__ import annotations

from typing import Callable

from ..ir.quant_grids import SCHEMES, Scheme


def dequantize_specs(native: Callable[[Scheme], bool],
                     native_gather: Callable[[Scheme], bool] = lambda scheme: False) -> tuple[str, ...]:
    """The pass specs (zero or one) that dequantize every registered scheme ``native`` rejects
    in qlinear nodes, and every one ``native_gather`` rejects in qembedding nodes (a tied
    table's packed rows: by default every target gathers from the decoded float table)."""
    lacking = [name for name, scheme in SCHEMES.items() if not native(scheme)]
    no_gather = [name for name, scheme in SCHEMES.items() if not native_gather(scheme)]
    options = ([f"schemes={'|'.join(lacking)}"] if lacking else []) + \
        ([f"gathers={'|'.join(no_gather)}"] if no_gather else [])
    return (f"dequantize{{{','.join(options)}}}",) if options else ()
