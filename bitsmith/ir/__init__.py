"""bitsmith's typed SSA IR: types, ops, graphs, verifier, text form and reference interpreter."""

from .builder import GraphBuilder
from .graph import Function, Location, Module, Node, TensorInfo, TensorTable, Value
from .interpreter import InterpreterError, evaluate, run_function
from .ops import OPS, get_op
from . import quantized as _quantized  # registers the qlinear op and its interpreter rule
from . import gguf_schemes as _gguf_schemes  # registers the gguf-* qlinear schemes
from . import scheme_int8 as _scheme_int8  # registers the rtn-int8 weight format
from . import quantized_embedding as _qembedding  # registers qembedding (a tied table's packed rows)
from . import bcq as _bcq  # registers the bcq_linear op (ShiftAddLLM) and its interpreter rule
from .parser import IRParseError, parse_module
from .printer import print_module
from .types import DTYPES, IRTypeError, TensorType
from .verifier import VerificationError, verify_module

__all__ = [
    "DTYPES", "Function", "GraphBuilder", "IRParseError", "IRTypeError", "InterpreterError", "Location", "Module",
    "Node", "OPS", "TensorInfo", "TensorTable", "TensorType", "Value", "VerificationError",
    "evaluate", "get_op", "parse_module", "print_module", "run_function", "verify_module",
]
