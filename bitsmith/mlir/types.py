"""bitsmith tensor types as MLIR ranked tensor types, and back.

Static dims stay numbers; a symbolic dim ("seq", "past+seq") becomes a dynamic dim ``?``,
its name kept in a ``bitsmith.shape`` attribute where the importer needs it (function
parameters; every other type is inferred again from the ops). ``uint8`` maps to MLIR's
unsigned ``ui8`` (packed quantized codes), ``bool`` to ``i1``; the arith dialect works on
signless integers only, so standard ops refuse uint8 operands (see ``elementwise.py``).
"""

from __future__ import annotations

import struct

from ..ir.symbolic import Dim
from ..ir.types import TensorType

ELEMENT_TYPES: dict[str, str] = {
    "float32": "f32", "float16": "f16", "float64": "f64",
    "int64": "i64", "int32": "i32", "int8": "i8", "uint8": "ui8", "bool": "i1",
}
DTYPE_OF_ELEMENT = {v: k for k, v in ELEMENT_TYPES.items()}
_INF_BITS = {"f16": ("e", "<H"), "f32": ("f", "<I"), "f64": ("d", "<Q")}


def element_type(dtype: str) -> str:
    return ELEMENT_TYPES[dtype]


def is_float(dtype: str) -> bool:
    return dtype.startswith("float")


def mlir_dim(d: Dim) -> str:
    return str(d) if isinstance(d, int) else "?"


def tensor_type(t: TensorType) -> str:
    """``tensor<?x64xf32>`` for f32[seq,64]; ``tensor<f32>`` for rank 0."""
    dims = "".join(f"{mlir_dim(d)}x" for d in t.shape)
    return f"tensor<{dims}{element_type(t.dtype)}>"


def has_symbolic_dims(t: TensorType) -> bool:
    return any(not isinstance(d, int) for d in t.shape)


def float_literal(value: float, elem: str) -> str:
    """An MLIR float literal of ``elem``: decimal with a point when finite, else its hex bits."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        fmt, bits = _INF_BITS[elem]
        return hex(struct.unpack(bits, struct.pack(fmt, value))[0])
    return "%.17e" % value


def element_literal(value: float | int | bool, elem: str) -> str:
    """One element of MLIR type ``elem`` as arith.constant and dense attributes read it."""
    if elem == "i1":
        return "true" if value else "false"
    if elem.startswith("f"):
        return float_literal(value, elem)
    return str(int(value))
