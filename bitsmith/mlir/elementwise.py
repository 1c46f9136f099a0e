"""Elementwise ops as one ``linalg.generic`` each: scalar bodies in arith and math.

Integer forms are signed (``arith.*si``); uint8 has no signless arith form and is refused.
Composite activations are spelled out from their definitions (sigmoid = 1/(1+e^-x),
silu = x·sigmoid(x), gelu with erf or the tanh approximation of Hendrycks & Gimpel 2016).
"""

from __future__ import annotations

import math

from ..errors import UnsupportedOpError
from ..ir.graph import Node
from .emitter import Body, FunctionEmitter, unsupported
from .registry import emits
from .types import element_type, is_float

_FLOAT_UNARY = {"exp": "math.exp", "log": "math.log", "sqrt": "math.sqrt", "rsqrt": "math.rsqrt",
                "tanh": "math.tanh", "cos": "math.cos", "sin": "math.sin", "erf": "math.erf", "abs": "math.absf"}
_FLOAT_BINARY = {"add": "arith.addf", "sub": "arith.subf", "mul": "arith.mulf", "div": "arith.divf",
                 "pow": "math.powf", "maximum": "arith.maximumf", "minimum": "arith.minimumf"}
_INT_BINARY = {"add": "arith.addi", "sub": "arith.subi", "mul": "arith.muli", "pow": "math.ipowi",
               "maximum": "arith.maxsi", "minimum": "arith.minsi", "logical_and": "arith.andi",
               "logical_or": "arith.ori"}
_BOOL_BINARY = {"maximum": "arith.ori", "minimum": "arith.andi", "logical_and": "arith.andi",
                "logical_or": "arith.ori", "mul": "arith.andi"}
# numpy comparisons: NaN compares unequal to everything, so "ne" is the unordered predicate
_FLOAT_CMP = {"eq": "oeq", "ne": "une", "lt": "olt", "le": "ole", "gt": "ogt", "ge": "oge"}
_INT_CMP = {"eq": "eq", "ne": "ne", "lt": "slt", "le": "sle", "gt": "sgt", "ge": "sge"}
_BOOL_CMP = {"eq": "eq", "ne": "ne", "lt": "ult", "le": "ule", "gt": "ugt", "ge": "uge"}


def refuse_uint8(em: FunctionEmitter, node: Node) -> None:
    if any(em.type_of(v).dtype == "uint8" for v in node.inputs) or node.outputs[0].type.dtype == "uint8":
        raise unsupported(node, "uint8 has no signless arith form")


def sigmoid_of(b: Body, x: str, elem: str) -> str:
    one = b.const(1.0, elem)
    e = b.op(f"math.exp {b.op(f'arith.negf {x} : {elem}')} : {elem}")
    return b.op(f"arith.divf {one}, {b.op(f'arith.addf {one}, {e} : {elem}')} : {elem}")


def unary_body(op: str, b: Body, x: str, elem: str, attrs: dict) -> str:
    if op in _FLOAT_UNARY and elem.startswith("f"):
        return b.op(f"{_FLOAT_UNARY[op]} {x} : {elem}")
    if op == "neg":
        if elem.startswith("f"):
            return b.op(f"arith.negf {x} : {elem}")
        return b.op(f"arith.subi {b.const(0, elem)}, {x} : {elem}")
    if op == "abs":
        return b.op(f"math.absi {x} : {elem}")
    if op == "logical_not":
        return b.op(f"arith.xori {x}, {b.const(True, 'i1')} : i1")
    if op == "reciprocal":
        return b.op(f"arith.divf {b.const(1.0, elem)}, {x} : {elem}")
    if op == "relu":
        return b.op(f"arith.maximumf {x}, {b.const(0.0, elem)} : {elem}")
    if op == "sigmoid":
        return sigmoid_of(b, x, elem)
    if op == "silu":
        return b.op(f"arith.mulf {x}, {sigmoid_of(b, x, elem)} : {elem}")
    if op == "gelu":
        half, one = b.const(0.5, elem), b.const(1.0, elem)
        if attrs["approximate"] == "tanh":
            x3 = b.op(f"arith.mulf {x}, {b.op(f'arith.mulf {x}, {x} : {elem}')} : {elem}")
            inner = b.op(f"arith.addf {x}, {b.op(f'arith.mulf {b.const(0.044715, elem)}, {x3} : {elem}')} : {elem}")
            t = b.op(f"math.tanh {b.op(f'arith.mulf {b.const(math.sqrt(2 / math.pi), elem)}, {inner} : {elem}')} : {elem}")
        else:
            t = b.op(f"math.erf {b.op(f'arith.mulf {x}, {b.const(1 / math.sqrt(2), elem)} : {elem}')} : {elem}")
        return b.op(f"arith.mulf {b.op(f'arith.mulf {half}, {x} : {elem}')}, "
                    f"{b.op(f'arith.addf {one}, {t} : {elem}')} : {elem}")
    raise KeyError(op)


@emits("neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "relu", "cos", "sin",
       "erf", "reciprocal", "gelu", "logical_not")
def _unary(em: FunctionEmitter, node: Node) -> str:
    refuse_uint8(em, node)
    elem = element_type(em.type_of(node.inputs[0]).dtype)
    attrs = node.attr_dict
    return em.map_elementwise(node.inputs, node.output.type,
                              lambda b, a: unary_body(node.op, b, a[0], elem, attrs))


def binary_body(op: str, b: Body, x: str, y: str, elem: str) -> str:
    if elem.startswith("f"):
        if op in _FLOAT_CMP:
            return b.op(f"arith.cmpf {_FLOAT_CMP[op]}, {x}, {y} : {elem}")
        return b.op(f"{_FLOAT_BINARY[op]} {x}, {y} : {elem}")
    cmp, table = (_BOOL_CMP, _BOOL_BINARY) if elem == "i1" else (_INT_CMP, _INT_BINARY)
    if op in cmp:
        return b.op(f"arith.cmpi {cmp[op]}, {x}, {y} : {elem}")
    if op not in table:
        raise UnsupportedOpError(op, target="mlir", detail=f"no {elem} form")
    if op == "pow":
        return b.op(f"math.ipowi {x}, {y} : {elem}")
    return b.op(f"{table[op]} {x}, {y} : {elem}")


@emits("add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
       "logical_and", "logical_or")
def _binary(em: FunctionEmitter, node: Node) -> str:
    refuse_uint8(em, node)
    elem = element_type(em.type_of(node.inputs[0]).dtype)
    return em.map_elementwise(node.inputs, node.output.type, lambda b, a: binary_body(node.op, b, a[0], a[1], elem))


@emits("where")
def _where(em: FunctionEmitter, node: Node) -> str:
    elem = element_type(node.output.type.dtype)
    return em.map_elementwise(node.inputs, node.output.type,
                              lambda b, a: b.op(f"arith.select {a[0]}, {a[1]}, {a[2]} : {elem}"))


def cast_body(b: Body, x: str, src: str, dst: str) -> str:
    """numpy ``astype``: floats truncate toward zero into ints, nonzero is True."""
    s, d = element_type(src), element_type(dst)
    if s == d:
        return x
    if dst == "bool":
        if is_float(src):
            return b.op(f"arith.cmpf une, {x}, {b.const(0.0, s)} : {s}")
        return b.op(f"arith.cmpi ne, {x}, {b.const(0, s)} : {s}")
    if is_float(src) and is_float(dst):
        widths = {"f16": 16, "f32": 32, "f64": 64}
        return b.op(f"arith.{'extf' if widths[d] > widths[s] else 'truncf'} {x} : {s} to {d}")
    if is_float(dst):
        return b.op(f"arith.{'uitofp' if src == 'bool' else 'sitofp'} {x} : {s} to {d}")
    if is_float(src):
        return b.op(f"arith.fptosi {x} : {s} to {d}")
    bits = {"i1": 1, "i8": 8, "i32": 32, "i64": 64}
    if bits[d] > bits[s]:
        return b.op(f"arith.{'extui' if src == 'bool' else 'extsi'} {x} : {s} to {d}")
    return b.op(f"arith.trunci {x} : {s} to {d}")


@emits("cast")
def _cast(em: FunctionEmitter, node: Node) -> str:
    refuse_uint8(em, node)
    src, dst = em.type_of(node.inputs[0]).dtype, node.output.type.dtype
    return em.map_elementwise(node.inputs, node.output.type, lambda b, a: cast_body(b, a[0], src, dst))
