"""The LUT engine as an extern step of the tvm-llvm step driver (tvm/native_step.py).

With the tvm-llvm host, every qlinear is an extern plan step. For the driver to run a whole
step in one C call, each such step needs a C entry point: the LUT engine's own ``lut_exec``
(its existing C entry, called with the operands ``NativeExecutor.plan`` validated once), plus
the per-call rules of ``native._BoundStream`` (input padding, zeroed output, single thread
below the auto-threads bar, bias added after), which stepdrv.c applies the same way.
Only for the engine ABI this binding was written against (``native.ABI_VERSION`` 2) and for
programs whose arrays are read-only (the same condition under which the Python path skips
re-validation); otherwise ``None`` and the host keeps the Python executor.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from ...errors import BitsmithError
from . import native
from .program import LayerEntry

ENGINE_ABI = 2  # lut_exec's signature in stepdrv.c's lut_exec_t


def native_extern(fast: "native.NativeExecutor | None", entry: LayerEntry, int8: bool, threads: int,
                  launcher: int | None, fallback: Callable[..., None], activation_bits: int = 32) -> Any:
    """A ``tvm.native_step.NativeExtern`` running ``entry`` on ``fast``, or None (see module doc).
    ``activation_bits=8`` needs the engine's ``lut_exec_tables`` (table kind ``TABLES_A8``); an
    engine from before W4A8 gets None, so the Python path runs (and reports the old library)."""
    from ..tvm.native_step import EXTERN_LAYER, NativeExtern
    if fast is None or native.ABI_VERSION != ENGINE_ABI:
        return None
    if activation_bits == 8 and not (int8 and getattr(fast, "has_a8", False)):
        return None
    program = entry.program
    if program.stream.flags.writeable or program.outliers.flags.writeable:
        return None
    try:
        bound = fast.plan(program)
    except BitsmithError:  # a stream the engine refuses: the loader's validation reports it, naming the layer
        return None
    call = getattr(bound, "_call", None)
    if call is None or len(call.args) != 7:
        return None
    stream, pos, ntables, nsegs, w, p, o = call.args
    rec = np.zeros(1, EXTERN_LAYER)
    rec["fn"] = ctypes.cast(call.func, ctypes.c_void_p).value
    rec["stream"], rec["pos"], rec["ntables"], rec["nsegs"] = stream, pos, ntables, nsegs
    rec["W"], rec["P"], rec["O"] = w, p, o
    rec["n"], rec["k"], rec["kpad"], rec["macs_per_row"] = bound.n, bound.k, bound.kpad, bound.macs_per_row
    rec["auto_single_below"] = native.AUTO_THREADS_MACS_POOL if launcher else native.AUTO_THREADS_MACS
    # the table kind lut_exec_tables takes (lut_exec, without A8, reads 0/1 the same way)
    kind = native.TABLES_A8 if activation_bits == 8 else native.TABLES_INT8 if int8 else native.TABLES_FP32
    rec["kind"], rec["threads"], rec["launcher"] = kind, threads, launcher or 0
    return NativeExtern(rec[0], (bound, program), fallback)
