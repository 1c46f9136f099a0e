"""Ops with no upstream form: generic ``"bitsmith.<op>"(...)`` operations, and calls.

qlinear (packed codes, scales, zero points, selectors, N:M indices, outlier CSR operands, in
the order ``ir/quantized.py`` gives) and attention over the KV cache keep their meaning in
bitsmith's op definitions; in MLIR they are unregistered operations in generic form whose
attributes are the node's (``scheme``, ``group_size``, ``scale``, ``causal``, ...), parsed
with ``allow_unregistered_dialects``. Any other registered op without an emitter in
``registry.py`` is exported the same way. ``call`` becomes ``func.call``.
"""

from __future__ import annotations

from ..ir.graph import Node
from .constants import symbol
from .emitter import FunctionEmitter
from .types import tensor_type


def _signature(em: FunctionEmitter, node: Node) -> str:
    ins = ", ".join(tensor_type(em.type_of(v)) for v in node.inputs)
    outs = ", ".join(tensor_type(o.type) for o in node.outputs)
    return f"({ins}) -> ({outs})"


def emit_dialect_op(em: FunctionEmitter, node: Node) -> str:
    args = ", ".join(em.ssa(v) for v in node.inputs)
    return em.emit(f'"bitsmith.{node.op}"({args}) : {_signature(em, node)}', len(node.outputs))


def emit_call(em: FunctionEmitter, node: Node) -> str:
    args = ", ".join(em.ssa(v) for v in node.inputs)
    return em.emit(f"func.call {symbol(str(node.attr('callee')))}({args}) : {_signature(em, node)}",
                   len(node.outputs))
