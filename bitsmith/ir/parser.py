"""Reads the text form written by ``printer.py`` back into an equal ``Module``.

The text names constants but holds no data, so the caller passes the ``TensorTable``; every
``tensor`` line is checked against it (present, same shape, dtype and sha256).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .declared_tensors import DeclaredTensorTable
from .graph import AttrValue, Function, Location, Module, Node, TensorInfo, TensorTable, Value
from .symbolic import Dim, SymbolicDimError, canonical
from .types import SHORT_TO_DTYPE, IRTypeError, TensorType


class IRParseError(ValueError):
    """Text that is not a well-formed module, or whose tensors do not match the given table."""


_STRING = r'"(?:[^"\\\n]|\\.)*"'
_NAME = rf"(?:[A-Za-z0-9_.$\-]+|{_STRING})"
_TOKEN = re.compile(rf"""
    (?P<newline>\n) | (?P<space>[ \t\r]+) | (?P<comment>//[^\n]*)
  | (?P<string>{_STRING})
  | (?P<value>%{_NAME}) | (?P<func>@{_NAME})
  | (?P<type>[a-z][a-z0-9]*\[[^\]\s]*\])
  | (?P<number>-inf\b|-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{{}}()\[\]:,=])
""", re.VERBOSE)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    line: int

    def __str__(self) -> str:
        return "end of text" if self.kind == "eof" else repr(self.text)


def tokenize(text: str) -> list[Token]:
    tokens, line, pos = [], 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise IRParseError(f"line {line}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind == "newline":
            line += 1
        elif kind not in ("space", "comment"):
            tokens.append(Token(kind, m.group(), line))
        pos = m.end()
    tokens.append(Token("eof", "", line))
    return tokens


def _unquote(text: str, line: int) -> str:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise IRParseError(f"line {line}: bad string {text}: {e}") from None


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.pos = 0

    # -- token helpers
    def peek(self, text: str | None = None, kind: str | None = None) -> bool:
        tok = self.tokens[self.pos]
        return (text is None or tok.text == text) and (kind is None or tok.kind == kind)

    def next(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos = min(self.pos + 1, len(self.tokens) - 1)
        return tok

    def error(self, expected: str) -> IRParseError:
        tok = self.tokens[self.pos]
        return IRParseError(f"line {tok.line}: expected {expected}, got {tok}")

    def expect(self, text: str | None = None, kind: str | None = None, what: str | None = None) -> Token:
        if not self.peek(text, kind):
            raise self.error(what or (repr(text) if text else str(kind)))
        return self.next()

    def accept(self, text: str) -> bool:
        if self.peek(text) and self.tokens[self.pos].kind in ("punct", "ident"):
            self.next()
            return True
        return False

    def separated(self, close: str, item) -> list:
        """Items separated by commas up to ``close`` (consumed); a trailing comma is allowed."""
        out = []
        while not self.accept(close):
            out.append(item())
            if not self.accept(","):
                self.expect(close, what=f"',' or {close!r}")
                break
        return out

    # -- pieces
    def name(self, kind: str) -> str:
        tok = self.expect(kind=kind, what="a %value" if kind == "value" else "an @function name")
        body = tok.text[1:]
        return _unquote(body, tok.line) if body.startswith('"') else body

    def string(self, what: str) -> str:
        tok = self.expect(kind="string", what=what)
        return _unquote(tok.text, tok.line)

    def type(self) -> TensorType:
        tok = self.expect(kind="type", what="a type like f32[batch,4]")
        short, dims = tok.text[:-1].split("[", 1)
        if short not in SHORT_TO_DTYPE:
            raise IRParseError(f"line {tok.line}: unknown dtype {short!r}; known: {', '.join(SHORT_TO_DTYPE)}")
        shape: list[Dim] = []
        for d in dims.split(",") if dims else []:
            try:
                shape.append(int(d) if d.isdigit() else canonical(d))
            except SymbolicDimError as e:
                raise IRParseError(f"line {tok.line}: {e}") from None
        try:
            return TensorType(tuple(shape), SHORT_TO_DTYPE[short])
        except IRTypeError as e:
            raise IRParseError(f"line {tok.line}: {e}") from None

    def attr_value(self) -> AttrValue:
        tok = self.next()
        if tok.kind == "string":
            return _unquote(tok.text, tok.line)
        if tok.kind == "number":
            is_float = tok.text == "-inf" or any(c in tok.text for c in ".eE")
            return float(tok.text) if is_float else int(tok.text)
        if tok.kind == "ident" and tok.text in _KEYWORDS:
            return _KEYWORDS[tok.text]
        if tok.text == "(" and tok.kind == "punct":
            return tuple(self.separated(")", self.attr_value))
        self.pos -= 1
        raise self.error("an attribute value (none, true, false, number, string or tuple)")

    def attr_item(self) -> tuple[str, AttrValue]:
        tok = self.next()
        if tok.kind not in ("ident", "string"):
            self.pos -= 1
            raise self.error("an attribute name")
        key = _unquote(tok.text, tok.line) if tok.kind == "string" else tok.text
        self.expect("=")
        return key, self.attr_value()

    def attrs(self) -> tuple[tuple[str, AttrValue], ...]:
        line = self.tokens[self.pos].line
        self.expect("{")
        items = tuple(self.separated("}", self.attr_item))
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise IRParseError(f"line {line}: attribute repeated in {keys}")
        return items

    # -- statements
    def node(self) -> Node:
        outs = [self.name("value")]
        while self.accept(","):
            outs.append(self.name("value"))
        self.expect("=", what="'=' after the node's outputs")
        op_tok = self.expect(kind="ident", what="an op name")
        self.expect("(")
        inputs = tuple(self.separated(")", lambda: self.name("value")))
        attrs = self.attrs() if self.peek("{") else ()
        self.expect(":", what="':' and the output types")
        types = [self.type()]
        while self.accept(","):
            types.append(self.type())
        if len(types) != len(outs):
            raise IRParseError(f"line {op_tok.line}: {len(outs)} outputs but {len(types)} types")
        loc = None
        if self.accept("loc"):
            self.expect("(")
            path = self.string("the location's module path")
            self.expect(",")
            source = self.string("the location's source")
            self.expect(")")
            loc = Location(path, source)
        return Node(op_tok.text, inputs, tuple(Value(n, t) for n, t in zip(outs, types)), attrs, loc)

    def param(self) -> Value:
        name = self.name("value")
        self.expect(":")
        return Value(name, self.type())

    def function(self) -> Function:
        self.expect("func")
        name = self.name("func")
        self.expect("(")
        params = tuple(self.separated(")", self.param))
        attrs = self.attrs() if self.accept("attrs") else ()
        self.expect("{", what="'attrs' or '{' opening the function")
        nodes = []
        while not self.accept("return"):
            if not self.peek(kind="value"):
                raise self.error("a node '%v = op(...) : type' or 'return'")
            nodes.append(self.node())
        results = [self.name("value")] if self.peek(kind="value") else []
        while results and self.accept(","):
            results.append(self.name("value"))
        self.expect("}", what="'}' closing the function after its return")
        return Function(name, params, tuple(nodes), tuple(results), attrs)

    def tensor(self) -> tuple[int, str, TensorType, str]:
        line = self.expect("tensor").line
        name = self.string("the tensor's name as a string")
        self.expect(":")
        t = self.type()
        self.expect("sha256")
        return line, name, t, self.string("the tensor's sha256 as a string")

    def module(self, tensors: TensorTable | None, declared_only: bool = False) -> Module:
        self.expect("module", what="'module'")
        attrs = self.attrs() if self.accept("attrs") else ()
        self.expect("{")
        named: list[str] = []
        declared: list[TensorInfo] = []
        while self.peek("tensor", kind="ident"):
            line, name, t, digest = self.tensor()
            if declared_only:
                declared.append(_declared_tensor(line, name, t, digest, named))
            else:
                _check_tensor(line, name, t, digest, tensors, named)
            named.append(name)
        functions = []
        while not self.accept("}"):
            if not self.peek("func"):
                raise self.error("'func', 'tensor' or '}'")
            functions.append(self.function())
        self.expect(kind="eof", what="end of text after the module")
        table = TensorTable() if tensors is None else tensors
        if tensors is not None and len(named) != len(tensors):
            table = tensors.subset(named)
        if declared_only:
            table = DeclaredTensorTable(declared=declared)
        return Module(tuple(functions), table, attrs)


_KEYWORDS: dict[str, AttrValue] = {"none": None, "true": True, "false": False,
                                   "inf": float("inf"), "nan": float("nan")}


def _check_tensor(line: int, name: str, t: TensorType, digest: str,
                  tensors: TensorTable | None, seen: list[str]) -> None:
    where = f"line {line}: tensor {name!r}"
    if name in seen:
        raise IRParseError(f"{where} is listed twice")
    if tensors is None:
        raise IRParseError(f"{where}: the text lists tensors; pass the TensorTable that holds their data")
    if name not in tensors:
        raise IRParseError(f"{where} is not in the given tensor table")
    info = tensors.info(name)
    if info.dtype != t.dtype or info.shape != t.shape:
        table_type = TensorType(info.shape, info.dtype)
        raise IRParseError(f"{where}: the text says {t} but the table holds {table_type}")
    if info.sha256 != digest:
        raise IRParseError(f"{where}: sha256 {digest} in the text but {info.sha256} in the table")


def _declared_tensor(line: int, name: str, t: TensorType, digest: str, seen: list[str]) -> TensorInfo:
    where = f"line {line}: tensor {name!r}"
    if name in seen:
        raise IRParseError(f"{where} is listed twice")
    if not all(isinstance(d, int) for d in t.shape) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise IRParseError(f"{where}: a constant needs a static shape and a 64-digit hex sha256, got {t} {digest!r}")
    return TensorInfo(name, t.shape, t.dtype, digest)


def parse_module(text: str, tensors: TensorTable | None = None, *, declared_only: bool = False) -> Module:
    """Parses ``print_module`` text; ``tensors`` must hold every tensor the text lists.

    The result's tensor table is ``tensors`` restricted to the names the text lists (an
    empty table when the text lists none and ``tensors`` is None). With ``declared_only``
    (and no ``tensors``) it is a DeclaredTensorTable that knows each listed tensor by name,
    shape, dtype and sha256 but holds no data.
    """
    if declared_only and tensors is not None:
        raise ValueError("parse_module: give either tensors or declared_only=True, not both")
    return _Parser(text).module(tensors, declared_only)
