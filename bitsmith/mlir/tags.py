"""How a bitsmith node is recognised in MLIR: the attributes on the op that defines it.

Export turns each node into a run of top-level ops; the last one carries
  ``bitsmith.name``      its output name (an array of names for several outputs),
  ``bitsmith.op``        the bitsmith op, for ops exported to upstream dialects (a
                         ``bitsmith.<op>`` operation is named by its own op name),
  ``bitsmith.attrs``     the node's attributes (a ``bitsmith.<op>`` carries them directly),
  ``bitsmith.operands``  which of the run's operands are the node's inputs, in order, when
                         that is not simply all of them in first-use order,
  ``bitsmith.loc``       [module path, source line] of the node's location.
The run's operands are the bitsmith values (parameters and tagged results) its ops use, in
first-use order over the ops and their regions (``run_operands``); the same walk serves the
exporter, which writes ``bitsmith.operands``, and the importer, which reads it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ..ir.graph import AttrValue, Location
from . import bindings

NAME, OP, ATTRS, OPERANDS, LOC, SHAPE = ("bitsmith.name", "bitsmith.op", "bitsmith.attrs", "bitsmith.operands",
                                         "bitsmith.loc", "bitsmith.shape")
MODULE_ATTRS = "bitsmith.module"
SHA256 = "bitsmith.sha256"
RESERVED = frozenset({NAME, OP, ATTRS, OPERANDS, LOC, SHAPE})


def encode(value: AttrValue) -> Any:
    """A bitsmith attribute value as an MLIR attribute (i64 ints, f64 floats, arrays)."""
    ir = bindings.ir()
    if value is None:
        return ir.UnitAttr.get()
    if isinstance(value, bool):
        return ir.BoolAttr.get(value)
    if isinstance(value, int):
        return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)
    if isinstance(value, float):
        return ir.FloatAttr.get_f64(value)
    if isinstance(value, str):
        return ir.StringAttr.get(value)
    if isinstance(value, tuple):
        return ir.ArrayAttr.get([encode(v) for v in value])
    raise TypeError(f"cannot encode attribute value {value!r}")


def encode_dict(items: Iterable[tuple[str, AttrValue]]) -> Any:
    return bindings.ir().DictAttr.get({k: encode(v) for k, v in items})


def decode(attr: Any) -> AttrValue:
    ir = bindings.ir()
    if isinstance(attr, ir.UnitAttr):
        return None
    if isinstance(attr, ir.BoolAttr):
        return bool(attr.value)
    if isinstance(attr, ir.IntegerAttr):
        return int(attr.value)
    if isinstance(attr, ir.FloatAttr):
        return float(attr.value)
    if isinstance(attr, ir.StringAttr):
        return attr.value
    if isinstance(attr, ir.ArrayAttr):
        return tuple(decode(a) for a in attr)
    raise ValueError(f"attribute {attr} is not a bitsmith attribute value")


def items(attrs: Any) -> list[tuple[str, Any]]:
    """(name, attribute) pairs of a DictAttr or of an operation's attribute map."""
    out = []
    for entry in attrs:
        out.append((entry, attrs[entry]) if isinstance(entry, str) else (entry.name, entry.attr))
    return out


def decode_dict(attr: Any) -> tuple[tuple[str, AttrValue], ...]:
    return tuple(sorted((name, decode(a)) for name, a in items(attr)))


def encode_location(loc: Location) -> Any:
    return encode((loc.module_path, loc.source))


def decode_location(attr: Any) -> Location:
    value = decode(attr)
    if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{LOC} must be [module path, source], got {attr}")
    return Location(value[0], value[1])


def _walk_operands(op: Any, out: list, seen: set, known: Callable[[Any], bool]) -> None:
    for v in op.operands:
        if known(v) and v not in seen:
            seen.add(v)
            out.append(v)
    for region in op.regions:
        for block in region:
            for inner in block.operations:
                _walk_operands(inner, out, seen, known)


def run_operands(ops: Iterable[Any], known: Callable[[Any], bool]) -> list:
    """The values ``known`` accepts that ``ops`` use, each once, in first-use order."""
    out: list = []
    seen: set = set()
    for op in ops:
        _walk_operands(op, out, seen, known)
    return out
