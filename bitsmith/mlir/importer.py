"""Reads MLIR written by ``export.py`` back into a bitsmith ``Module``.

Each ``func.func`` becomes a function; each tagged op (``tags.py``) a node whose inputs are
the bitsmith values its run of ops reads, whose attributes come from ``bitsmith.attrs`` (or,
for ``bitsmith.<op>`` operations, their own attributes) and whose output types are inferred
again by bitsmith's op definitions and checked against the MLIR result types. Untagged ops
are the pieces of a run and carry no node of their own. Constants: inline ``dense`` data is
read back; an ``ml_program`` external global needs its data from ``tensors`` (an artifact's
weights or a safetensors file), checked by sha256, or stays data-less: then ``missing``
lists it by name, shape, dtype and hash and ``module``'s table is a ``DeclaredTensorTable``
that knows it by those alone (the module verifies; reading its data raises).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..ir.declared_tensors import DeclaredTensorTable
from ..ir.graph import Function, Module, Node, TensorInfo, TensorTable, Value, sha256_of
from ..ir.ops import get_op
from ..ir.types import TensorType, numpy_dtype
from . import bindings
from .bindings import MLIRInteropError
from .tags import (ATTRS, LOC, MODULE_ATTRS, NAME, OP, OPERANDS, RESERVED, SHA256, SHAPE, decode, decode_dict,
                   decode_location, items, run_operands)
from .types import DTYPE_OF_ELEMENT, tensor_type


@dataclass(frozen=True)
class ImportedModule:
    """The module, and the constants whose data neither the file nor ``tensors`` held."""

    module: Module
    missing: tuple[TensorInfo, ...] = ()


def _tensor_type(mlir_type: Any, shape: Any = None) -> TensorType:
    ir = bindings.ir()
    t = ir.RankedTensorType(mlir_type)
    elem = str(t.element_type)
    if elem not in DTYPE_OF_ELEMENT:
        raise MLIRInteropError(f"element type {elem} has no bitsmith dtype")
    dynamic = ir.ShapedType.get_dynamic_size()
    if shape is None:
        if any(m == dynamic for m in t.shape):
            raise MLIRInteropError(f"type {mlir_type}: a dynamic dim needs its name in {SHAPE}")
        return TensorType(tuple(t.shape), DTYPE_OF_ELEMENT[elem])
    dims = tuple(shape)  # a symbol where MLIR has ?, the same number where it has one
    if len(dims) != t.rank or any((m != dynamic) if isinstance(d, str) else (m != d) for d, m in zip(dims, t.shape)):
        raise MLIRInteropError(f"type {mlir_type} does not fit the bitsmith dims {list(dims)} of {SHAPE}")
    return TensorType(dims, DTYPE_OF_ELEMENT[elem])


def _attr(op: Any, key: str) -> Any:
    return op.attributes[key] if key in op.attributes else None


def _dense_data(attr: Any, t: TensorType) -> np.ndarray:
    """The data of a ``dense<...>`` attribute (a splat stands for every element)."""
    array = np.array(attr, dtype=numpy_dtype(t.dtype))
    shape = tuple(int(d) for d in t.shape)
    if array.size != int(np.prod(shape, dtype=np.int64)):
        return np.full(shape, array.reshape(-1)[0], dtype=array.dtype)
    return array.reshape(shape)


class _Importer:
    def __init__(self, mlir_module: Any, tensors: Mapping[str, np.ndarray] | None) -> None:
        self.top = {}
        self.globals: dict[str, tuple[TensorType, str]] = {}
        for op in mlir_module.body.operations:
            name = op.operation.name
            if name == "func.func":
                self.top[bindings.ir().StringAttr(op.attributes["sym_name"]).value] = op
            elif name == "ml_program.global":
                sym = bindings.ir().StringAttr(op.attributes["sym_name"]).value
                sha = _attr(op, SHA256)
                self.globals[sym] = (_tensor_type(bindings.ir().TypeAttr(op.attributes["type"]).value),
                                     decode(sha) if sha is not None else "")
            else:
                raise MLIRInteropError(f"unexpected top-level op {name}; expected func.func and ml_program.global")
        self.given = tensors or {}
        self.data: dict[str, np.ndarray] = {}
        self.missing: dict[str, TensorInfo] = {}
        self.functions: dict[str, Function] = {}
        self.in_progress: list[str] = []

    def function(self, name: str) -> Function:
        if name in self.functions:
            return self.functions[name]
        if name not in self.top:
            raise MLIRInteropError(f"call to @{name}, which the module does not define")
        if name in self.in_progress:
            raise MLIRInteropError(f"recursive calls through @{name}")
        self.in_progress.append(name)
        self.functions[name] = fn = self._read_function(name, self.top[name])
        self.in_progress.pop()
        return fn

    def _read_function(self, name: str, func: Any) -> Function:
        block = func.regions[0].blocks[0]
        arg_attrs = list(func.attributes["arg_attrs"]) if "arg_attrs" in func.attributes else []
        if len(arg_attrs) != len(block.arguments):
            raise MLIRInteropError(f"@{name}: every argument needs a {NAME} attribute")
        env: dict[Any, str] = {}
        types: dict[str, TensorType] = {}
        params = []
        for arg, attrs in zip(block.arguments, arg_attrs):
            d = dict(items(bindings.ir().DictAttr(attrs)))
            if NAME not in d:
                raise MLIRInteropError(f"@{name}: argument {arg.arg_number} has no {NAME}")
            p = Value(decode(d[NAME]), _tensor_type(arg.type, decode(d[SHAPE]) if SHAPE in d else None))
            env[arg] = p.name
            types[p.name] = p.type
            params.append(p)
        nodes: list[Node] = []
        results: tuple[str, ...] = ()
        start = 0
        ops = list(block.operations)
        for i, op in enumerate(ops):
            if op.operation.name == "func.return":
                results = tuple(self._known(env, v, name) for v in op.operands)
            elif NAME in op.attributes:
                node = self._node(name, op, ops[start:i + 1], env, types)
                nodes.append(node)
                for result, out in zip(op.results, node.outputs):
                    env[result] = out.name
                    types[out.name] = out.type
                start = i + 1
        fn_attrs = tuple(sorted((k[len("bitsmith."):], decode(a)) for k, a in items(func.attributes)
                                if k.startswith("bitsmith.")))
        fn = Function(name, tuple(params), tuple(nodes), results)
        return fn.replace(attrs=fn_attrs) if fn_attrs else fn

    @staticmethod
    def _known(env: dict, v: Any, fn: str) -> str:
        if v not in env:
            raise MLIRInteropError(f"@{fn}: a returned value is not a bitsmith value (no {NAME} on its op)")
        return env[v]

    def _node(self, fn: str, op: Any, run: list, env: dict, types: dict) -> Node:
        names = decode(op.attributes[NAME])
        names = names if isinstance(names, tuple) else (names,)
        if OP in op.attributes:
            kind = decode(op.attributes[OP])
            attrs = decode_dict(op.attributes[ATTRS]) if ATTRS in op.attributes else ()
        elif op.operation.name.startswith("bitsmith."):
            kind = op.operation.name[len("bitsmith."):]
            attrs = tuple(sorted((k, decode(a)) for k, a in items(op.attributes) if k not in RESERVED))
        elif op.operation.name == "func.call":
            kind = "call"
            attrs = (("callee", bindings.ir().FlatSymbolRefAttr(op.attributes["callee"]).value),)
        else:
            raise MLIRInteropError(f"@{fn}: {op.operation.name} tagged %{names[0]} without {OP}")
        operands = [env[v] for v in run_operands(run, lambda v: v in env)]
        positions = decode(op.attributes[OPERANDS]) if OPERANDS in op.attributes else tuple(range(len(operands)))
        if any(not isinstance(p, int) or not 0 <= p < len(operands) for p in positions):
            raise MLIRInteropError(f"@{fn}: %{names[0]}: {OPERANDS} {positions} do not index its {len(operands)} operands")
        inputs = tuple(operands[p] for p in positions)
        loc = decode_location(op.attributes[LOC]) if LOC in op.attributes else None
        out_types = self._output_types(fn, kind, op, inputs, attrs, types)
        if len(out_types) != len(names) or len(op.results) != len(names):
            raise MLIRInteropError(f"@{fn}: %{names[0]} ({kind}) names {len(names)} outputs for {len(op.results)} results")
        for result, t in zip(op.results, out_types):
            if str(result.type) != tensor_type(t):
                raise MLIRInteropError(f"@{fn}: {kind} %{names[0]} has MLIR type {result.type}, bitsmith infers {t}")
        return Node(kind, inputs, tuple(Value(n, t) for n, t in zip(names, out_types)), attrs, loc)

    def _output_types(self, fn: str, kind: str, op: Any, inputs: tuple, attrs: tuple, types: dict) -> tuple:
        if kind == "constant":
            return (self._constant(dict(attrs)["name"], op),)
        if kind == "call":
            callee = self.function(dict(attrs)["callee"])
            if SHAPE in op.attributes:  # symbolic result dims, in the caller's symbols
                shapes = decode(op.attributes[SHAPE])
                return tuple(_tensor_type(r.type, s) for r, s in zip(op.results, shapes))
            return callee.result_types()
        try:
            opdef = get_op(kind)
            return opdef.infer(tuple(types[v] for v in inputs), dict(attrs))
        except Exception as e:  # IRTypeError, KeyError: a malformed node
            raise MLIRInteropError(f"@{fn}: {kind} with inputs {list(inputs)}: {e}") from e

    def _constant(self, name: str, op: Any) -> TensorType:
        t = _tensor_type(op.results[0].type)
        if op.operation.name == "arith.constant":
            self.data[name] = _dense_data(op.attributes["value"], t)
            return t
        if name not in self.globals:
            raise MLIRInteropError(f"constant {name!r} has no ml_program.global")
        gt, sha = self.globals[name]
        if name in self.given:
            array = np.asarray(self.given[name])
            if tuple(array.shape) != tuple(gt.shape) or array.dtype != numpy_dtype(gt.dtype) or sha256_of(array) != sha:
                raise MLIRInteropError(f"tensor {name!r} given for the import does not match the file's "
                                       f"{gt} sha256 {sha[:16]}...")
            self.data[name] = array
        else:
            self.missing[name] = TensorInfo(name, tuple(gt.shape), gt.dtype, sha)
        return gt

    def module(self, mlir_module: Any) -> ImportedModule:
        for name in self.top:
            self.function(name)
        attrs = decode_dict(mlir_module.operation.attributes[MODULE_ATTRS]) \
            if MODULE_ATTRS in mlir_module.operation.attributes else ()
        funcs = tuple(self.functions[n] for n in self.top)
        declared = [self.missing[n] for n in sorted(self.missing)]
        table = DeclaredTensorTable(self.data, declared) if declared else TensorTable(self.data)
        module = Module(funcs, table, attrs)
        return ImportedModule(module, tuple(declared))


def import_module(text: str, tensors: Mapping[str, np.ndarray] | None = None) -> ImportedModule:
    """Parses and verifies ``text`` with MLIR, then reads the bitsmith module it encodes."""
    ir = bindings.ir()
    with bindings.new_context(), ir.Location.unknown():
        try:
            parsed = ir.Module.parse(text)
            parsed.operation.verify()
        except ir.MLIRError as e:
            raise MLIRInteropError(f"MLIR rejected the file: {e}") from e
        return _Importer(parsed, tensors).module(parsed)
