"""IR symbolic dims -> TIR expressions for one kernel.

A kernel's parameters carry IR dims such as ``"seq"``, ``"past+seq"`` or ``"batch*seq"``.
TVM binds a shape variable only from a buffer dim that *is* that variable, so a compound dim
can be an expression over plain symbols only when each of those symbols is a plain dim of
some parameter of the same kernel; otherwise the whole compound dim gets a fresh variable
of its own (e.g. attention sees ``k: [b, kvh, past+seq, d]`` but no plain ``past``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from tvm import tirx

from ...ir import symbolic as sym
from ...ir.symbolic import Dim

INDEX_DTYPE = "int64"


def _fresh_name(d: str) -> str:
    return "d_" + re.sub(r"[^A-Za-z0-9_]", "_", d.replace("+", "_p_").replace("*", "_x_").replace("-", "_m_"))


class DimEnv:
    """Maps the IR dims of one kernel's parameters to TIR variables / expressions."""

    def __init__(self, param_shapes: Iterable[Sequence[Dim]]) -> None:
        shapes = [tuple(s) for s in param_shapes]
        plain = {d for s in shapes for d in s if isinstance(d, str) and sym.SYMBOL_NAME.match(d)}
        self.vars: dict[str, tirx.Var] = {name: tirx.Var(name, INDEX_DTYPE) for name in sorted(plain)}
        self._compound: dict[str, Any] = {}
        for s in shapes:
            for d in s:
                if isinstance(d, str) and d not in self.vars:
                    self._compound.setdefault(sym.canonical(d), None)
        for d in list(self._compound):
            if sym.symbols(d) <= set(self.vars):
                self._compound[d] = self._poly_expr(d)
            else:
                v = tirx.Var(_fresh_name(d), INDEX_DTYPE)
                self._compound[d] = v

    def _poly_expr(self, d: str) -> Any:
        total = None
        for mono, c in sym._to_poly(d).items():
            term: Any = tirx.const(c, INDEX_DTYPE)
            for s in mono:
                term = self.vars[s] if (c == 1 and term is not None and _is_one(term)) else term * self.vars[s]
            total = term if total is None else total + term
        return total if total is not None else tirx.const(0, INDEX_DTYPE)

    def dim(self, d: Dim) -> Any:
        if isinstance(d, int):
            return tirx.const(d, INDEX_DTYPE)
        if d in self.vars:
            return self.vars[d]
        key = sym.canonical(d)
        if isinstance(key, int):
            return tirx.const(key, INDEX_DTYPE)
        if key in self.vars:
            return self.vars[key]
        if key not in self._compound:  # a dim only used inside the kernel: derive it if we can
            if sym.symbols(key) <= set(self.vars):
                self._compound[key] = self._poly_expr(key)
            else:
                raise KeyError(f"dim {d!r} cannot be expressed from this kernel's parameters")
        return self._compound[key]

    def shape(self, dims: Sequence[Dim]) -> list[Any]:
        return [self.dim(d) for d in dims]


def _is_one(e: Any) -> bool:
    return isinstance(e, tirx.IntImm) and e.value == 1
