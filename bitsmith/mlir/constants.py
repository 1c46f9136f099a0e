"""Constants: external references to the artifact's weights by default, inline on request.

External (default): one ``ml_program.global private @"<tensor name>"(#ml_program.extern :
T) : T {bitsmith.sha256 = "..."}`` per tensor (ml_program's own marker for a value that
lives outside the IR) and an ``ml_program.global_load_const`` where a function reads it; the
name is the artifact's tensor name (weights.safetensors) and the sha256 the manifest's, so
a consumer finds and checks the data, and the file stays small. Inline (``inline_weights``,
and tensors of at most ``inline_max_elements`` elements): ``arith.constant dense<"0x..."> :
T`` with the raw little-endian bytes, which lowers to LLVM and runs in the ExecutionEngine.
"""

from __future__ import annotations

import numpy as np

from ..ir.graph import Node, TensorInfo, constant_type
from .emitter import FunctionEmitter
from .types import tensor_type


def mlir_string(text: str) -> str:
    """An MLIR string literal: printable ASCII as is, every other byte as \\XX."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 32 <= byte < 127 and ch not in '"\\' else f"\\{byte:02X}")
    return '"' + "".join(out) + '"'


def symbol(name: str) -> str:
    return "@" + mlir_string(name)


def declare_external(info: TensorInfo) -> str:
    t = tensor_type(constant_type(info))
    return f"ml_program.global private {symbol(info.name)}(#ml_program.extern : {t}) : {t}"


def _nested(values: np.ndarray) -> str:
    if values.ndim == 0:
        return "true" if values else "false"
    return "[" + ", ".join(_nested(v) for v in values) + "]"


def dense_literal(array: np.ndarray) -> str:
    """``dense<...>`` contents: raw bytes as hex (bool as a nested list of true/false)."""
    if array.dtype == np.bool_:
        return _nested(array)
    return '"0x' + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes().hex().upper() + '"'


def is_inline(info: TensorInfo, inline_weights: bool, inline_max_elements: int) -> bool:
    return inline_weights or int(np.prod(info.shape, dtype=np.int64)) <= inline_max_elements


def emit_constant(em: FunctionEmitter, node: Node, info: TensorInfo, data: np.ndarray | None) -> str:
    t = tensor_type(constant_type(info))
    if data is None:
        return em.emit(f"ml_program.global_load_const {symbol(info.name)} : {t}")
    return em.emit(f"arith.constant dense<{dense_literal(data)}> : {t}")
