"""Lowering exported MLIR to LLVM with upstream passes and running it in MLIR's ExecutionEngine.

The pipeline bufferizes the tensors (one-shot, function boundaries with identity layouts,
so arguments and results are plain row-major memrefs), turns linalg into loops and every
dialect into the LLVM dialect; math ops without an LLVM intrinsic (erf, tanh) become libm
calls, which the JIT resolves in this process. Functions get ``llvm.emit_c_interface`` and
are called through ``_mlir_ciface_<name>(results*, args*...)`` with ctypes memref
descriptors. Only static shapes run (a dynamic dim has no size to allocate here), and only
modules without ``bitsmith.*`` ops or external weights (export with
``ExportOptions(inline_weights=True, attention="linalg")``). Result buffers are allocated by
the compiled code and copied out; they are not freed (a result may alias a global).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..ir.types import TensorType, numpy_dtype
from . import bindings
from .bindings import MLIRInteropError
from .types import DTYPE_OF_ELEMENT

LOWERING_PIPELINE = (
    "builtin.module(one-shot-bufferize{bufferize-function-boundaries "
    "function-boundary-type-conversion=identity-layout-map},"
    "convert-linalg-to-loops,convert-scf-to-cf,expand-strided-metadata,lower-affine,"
    "finalize-memref-to-llvm,convert-math-to-llvm,convert-math-to-libm,convert-arith-to-llvm,"
    "convert-index-to-llvm,convert-func-to-llvm,convert-cf-to-llvm,reconcile-unrealized-casts)"
)


@dataclass(frozen=True)
class Signature:
    args: tuple[TensorType, ...]
    results: tuple[TensorType, ...]


def _static_type(t: Any, where: str) -> TensorType:
    ir = bindings.ir()
    rt = ir.RankedTensorType(t)
    if not rt.has_static_shape:
        raise MLIRInteropError(f"{where}: type {t} has dynamic dims; the ExecutionEngine run needs static shapes")
    elem = str(rt.element_type)
    if elem not in DTYPE_OF_ELEMENT:
        raise MLIRInteropError(f"{where}: element type {elem} cannot be passed from numpy")
    return TensorType(tuple(rt.shape), DTYPE_OF_ELEMENT[elem])


def _descriptor_type(rank: int) -> type:
    fields = [("allocated", ctypes.c_void_p), ("aligned", ctypes.c_void_p), ("offset", ctypes.c_longlong)]
    if rank:
        fields += [("shape", ctypes.c_longlong * rank), ("strides", ctypes.c_longlong * rank)]
    return type(f"MemRef{rank}D", (ctypes.Structure,), {"_fields_": fields})


def _descriptor(array: np.ndarray) -> Any:
    d = _descriptor_type(array.ndim)()
    d.allocated = d.aligned = array.ctypes.data
    d.offset = 0
    if array.ndim:
        d.shape[:] = list(array.shape)
        d.strides[:] = [s // array.itemsize for s in array.strides]
    return d


def _read(d: Any, t: TensorType) -> np.ndarray:
    dtype = numpy_dtype(t.dtype)
    shape = tuple(int(s) for s in t.shape)
    if any(s == 0 for s in shape):
        return np.zeros(shape, dtype)
    strides = [int(d.strides[i]) for i in range(len(shape))] if shape else []
    span = 1 + sum((s - 1) * st for s, st in zip(shape, strides))
    base = d.aligned + d.offset * dtype.itemsize
    flat = np.frombuffer((ctypes.c_char * (span * dtype.itemsize)).from_address(base), dtype=dtype, count=span)
    return np.lib.stride_tricks.as_strided(flat, shape, [st * dtype.itemsize for st in strides]).copy()


class MLIRProgram:
    """An exported module lowered to LLVM and JIT-compiled; ``run`` calls one of its functions."""

    def __init__(self, text: str, opt_level: int = 2) -> None:
        ir = bindings.ir()
        self._context = bindings.new_context()
        with self._context, ir.Location.unknown():
            module = ir.Module.parse(text)
            self.signatures: dict[str, Signature] = {}
            for op in module.body.operations:
                if op.operation.name != "func.func":
                    raise MLIRInteropError(f"{op.operation.name} cannot run in the ExecutionEngine (export with "
                                           f"inline_weights=True)")
                name = ir.StringAttr(op.attributes["sym_name"]).value
                ftype = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value)
                self.signatures[name] = Signature(
                    tuple(_static_type(t, f"@{name} argument") for t in ftype.inputs),
                    tuple(_static_type(t, f"@{name} result") for t in ftype.results))
                op.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            try:
                bindings.passmanager().PassManager.parse(LOWERING_PIPELINE).run(module.operation)
            except ir.MLIRError as e:
                raise MLIRInteropError(f"lowering to LLVM failed: {e}") from e
            self._module = module
            self._engine = bindings.execution_engine().ExecutionEngine(module, opt_level=opt_level)

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if function not in self.signatures:
            raise MLIRInteropError(f"no function @{function}; the module has {sorted(self.signatures)}")
        sig = self.signatures[function]
        if len(args) != len(sig.args):
            raise MLIRInteropError(f"@{function} takes {len(sig.args)} arguments, got {len(args)}")
        arrays = []
        for i, (a, t) in enumerate(zip(args, sig.args)):
            a = np.ascontiguousarray(a, dtype=numpy_dtype(t.dtype))
            if a.shape != tuple(t.shape):
                raise MLIRInteropError(f"@{function} argument {i}: expected shape {t.shape}, got {a.shape}")
            arrays.append(a)
        results_type = type("Results", (ctypes.Structure,),
                            {"_fields_": [(f"r{i}", _descriptor_type(t.rank)) for i, t in enumerate(sig.results)]})
        results = results_type()
        descriptors = [_descriptor(a) for a in arrays]  # kept alive through the call
        packed = [ctypes.pointer(ctypes.pointer(d)) for d in descriptors]
        if sig.results:
            packed.insert(0, ctypes.pointer(ctypes.pointer(results)))
        self._engine.invoke(function, *packed)
        return [_read(getattr(results, f"r{i}"), t) for i, t in enumerate(sig.results)]
