"""The IR's text form: a deterministic, human-readable print of a ``Module``.

Grammar (one statement a line; ``parser.py`` reads it back to an equal module)::

    module [attrs {key = value, ...}] {
      tensor "name" : f32[2,3] sha256 "<hex>"
      func @main(%x: f32[batch,seq,4], ...) [attrs {key = value, ...}] {
        %a, %b = op(%x, %y) {key = value, ...} : f32[batch,seq,4], i1[] loc("path", "file.py:1")
        %c = call(%a) {callee = "sub"} : f32[batch,seq,4]
        return %a, %c
      }
      func @sub(%a: f32[batch,seq,4]) attrs {device = "attention"} {
        ...
      }
    }

Constants appear by name, shape, dtype and sha256, never by data. Strings are JSON strings
(ASCII-escaped, so always one line); floats print as ``repr`` so they read back exactly; a
value or function name that is not ``[A-Za-z0-9_.$-]+`` is printed as a JSON string after
its ``%`` or ``@``. Function attributes (``attrs {...}`` after the parameters) are omitted
when there are none; a ``call`` names its callee by the attribute ``callee``.
"""

from __future__ import annotations

import json
import re

from .graph import AttrValue, Function, Location, Module, Node, TensorInfo
from .types import DTYPES, TensorType

BARE_NAME = re.compile(r"[A-Za-z0-9_.$\-]+")
BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)


def format_name(sigil: str, name: str) -> str:
    return sigil + (name if BARE_NAME.fullmatch(name) else quote(name))


def format_attr_value(v: AttrValue) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # shortest text that reads back to the same float: "1e-05", "inf"
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, tuple):
        items = ", ".join(format_attr_value(x) for x in v)
        return f"({items},)" if len(v) == 1 else f"({items})"
    raise TypeError(f"cannot print attribute value {v!r} ({type(v).__name__})")


def format_attrs(attrs: tuple[tuple[str, AttrValue], ...]) -> str:
    items = (f"{k if BARE_KEY.fullmatch(k) else quote(k)} = {format_attr_value(v)}" for k, v in attrs)
    return "{" + ", ".join(items) + "}"


def format_type(t: TensorType) -> str:
    return f"{DTYPES[t.dtype][0]}[{','.join(str(d) for d in t.shape)}]"


def format_location(loc: Location) -> str:
    return f"loc({quote(loc.module_path)}, {quote(loc.source)})"


def format_tensor(info: TensorInfo) -> str:
    return f"tensor {quote(info.name)} : {format_type(TensorType(info.shape, info.dtype))} sha256 {quote(info.sha256)}"


def format_node(node: Node) -> str:
    outs = ", ".join(format_name("%", o.name) for o in node.outputs)
    ins = ", ".join(format_name("%", i) for i in node.inputs)
    text = f"{outs} = {node.op}({ins})"
    if node.attrs:
        text += " " + format_attrs(node.attrs)
    text += " : " + ", ".join(format_type(o.type) for o in node.outputs)
    if node.loc is not None:
        text += " " + format_location(node.loc)
    return text


def format_function(fn: Function, indent: str = "  ") -> list[str]:
    params = ", ".join(f"{format_name('%', p.name)}: {format_type(p.type)}" for p in fn.params)
    attrs = f" attrs {format_attrs(fn.attrs)}" if fn.attrs else ""
    lines = [f"{indent}func {format_name('@', fn.name)}({params}){attrs} {{"]
    lines += [f"{indent}  {format_node(n)}" for n in fn.nodes]
    results = ", ".join(format_name("%", r) for r in fn.results)
    lines += [f"{indent}  return {results}".rstrip(), f"{indent}}}"]
    return lines


def print_module(module: Module) -> str:
    """The module's text form; equal modules print the same text."""
    header = "module" + (f" attrs {format_attrs(module.attrs)}" if module.attrs else "") + " {"
    lines = [header]
    lines += [f"  {format_tensor(info)}" for info in module.tensors.infos()]
    for fn in module.functions:
        lines += format_function(fn)
    lines.append("}")
    return "\n".join(lines) + "\n"
