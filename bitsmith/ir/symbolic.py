"""Symbolic tensor dimensions.

A dimension is an ``int`` or a canonical polynomial string over named symbols, such as
``"seq"``, ``"past+seq"`` or ``"batch*seq"``. Polynomials with integer coefficients are
enough for the shapes LLM graphs produce (concatenating caches adds lengths, flattening
batch and sequence multiplies them) and keep equality a plain string comparison.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping, Union

Dim = Union[int, str]

# A monomial is a sorted tuple of symbol names (with repetition); () is the constant term.
Poly = dict[tuple[str, ...], int]

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")
SYMBOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class SymbolicDimError(ValueError):
    """A dimension expression that cannot be parsed or evaluated."""


def _parse(text: str) -> Poly:
    tokens: list[tuple[str, str]] = []
    for number, name, other in _TOKEN.findall(text):
        if number:
            tokens.append(("int", number))
        elif name:
            tokens.append(("sym", name))
        elif other.strip():
            if other not in "+-*":
                raise SymbolicDimError(f"bad character {other!r} in dimension {text!r}")
            tokens.append(("op", other))
    poly: Poly = {}
    sign, coeff, mono, expect_factor = 1, 1, [], True
    for kind, tok in tokens + [("op", "+")]:
        if expect_factor:
            if kind == "op" and tok == "-" and coeff == 1 and not mono:
                sign = -sign
                continue
            if kind == "int":
                coeff *= int(tok)
            elif kind == "sym":
                mono.append(tok)
            else:
                raise SymbolicDimError(f"malformed dimension {text!r}")
            expect_factor = False
        else:
            if kind != "op":
                raise SymbolicDimError(f"malformed dimension {text!r}")
            if tok == "*":
                expect_factor = True
                continue
            key = tuple(sorted(mono))
            poly[key] = poly.get(key, 0) + sign * coeff
            sign, coeff, mono, expect_factor = (-1 if tok == "-" else 1), 1, [], True
    return {k: v for k, v in poly.items() if v != 0}


def _to_poly(d: Dim) -> Poly:
    if isinstance(d, bool):
        raise SymbolicDimError(f"dimension must be int or str, got {d!r}")
    if isinstance(d, int):
        return {(): d} if d else {}
    if isinstance(d, str):
        return _parse(d)
    raise SymbolicDimError(f"dimension must be int or str, got {type(d).__name__}")


def _from_poly(p: Poly) -> Dim:
    p = {k: v for k, v in p.items() if v != 0}
    if not p:
        return 0
    if set(p) == {()}:
        return p[()]
    terms = []
    # symbols first (sorted), constant last: "past+seq+1"
    for mono in sorted(p, key=lambda m: (m == (), m)):
        c = p[mono]
        body = "*".join(mono)
        if not mono:
            body = str(abs(c))
        elif abs(c) != 1:
            body = f"{abs(c)}*{body}"
        terms.append(("-" if c < 0 else "+", body))
    text = "".join(s + b for s, b in terms)
    return text[1:] if text.startswith("+") else text


def canonical(d: Dim) -> Dim:
    """The canonical form of a dimension: an int when constant, else a sorted polynomial."""
    if isinstance(d, str):
        return _canonical_text(d)
    return _from_poly(_to_poly(d))


@functools.lru_cache(maxsize=4096)
def _canonical_text(text: str) -> Dim:
    # the verifier asks for the same few dims ("seq", "past+seq") on every node of every pass
    return _from_poly(_parse(text))


def add(a: Dim, b: Dim) -> Dim:
    pa, pb = _to_poly(a), _to_poly(b)
    for k, v in pb.items():
        pa[k] = pa.get(k, 0) + v
    return _from_poly(pa)


def sub(a: Dim, b: Dim) -> Dim:
    return add(a, mul(b, -1))


@functools.lru_cache(maxsize=4096)
def mul(a: Dim, b: Dim) -> Dim:
    # pure on hashable dims; lowering asks for the same products (``[batch*seq, hidden]``) per layer
    out: Poly = {}
    for ka, va in _to_poly(a).items():
        for kb, vb in _to_poly(b).items():
            key = tuple(sorted(ka + kb))
            out[key] = out.get(key, 0) + va * vb
    return _from_poly(out)


def product(dims: tuple[Dim, ...]) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def terms(d: Dim) -> dict[tuple[str, ...], int]:
    """``d`` as a polynomial: coefficient per monomial (a sorted tuple of symbols; () is the constant)."""
    return _to_poly(d)


def symbols(d: Dim) -> set[str]:
    return set(_symbols(d))


@functools.lru_cache(maxsize=4096)
def _symbols(d: Dim) -> frozenset[str]:
    # plan checks ask for the same few dims' symbols once per shape of every step
    return frozenset(s for mono in _to_poly(d) for s in mono)


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    return evaluate_poly(_to_poly(d), bindings, d)


def polynomial(d: Dim) -> Poly:
    """``d`` as {monomial (sorted symbols): coefficient}, to evaluate many times (``evaluate_poly``)."""
    return dict(_to_poly(d))


def evaluate_poly(poly: Poly, bindings: Mapping[str, int], d: Dim | None = None) -> int:
    """The value of ``polynomial(d)`` under ``bindings`` (``d`` names it in the error)."""
    total = 0
    for mono, c in poly.items():
        term = c
        for s in mono:
            if s not in bindings:
                raise SymbolicDimError(f"symbol {s!r} of dimension {d!r} is unbound")
            term *= bindings[s]
        total += term
    return total


def is_static(d: Dim) -> bool:
    return isinstance(d, int)


def dims_equal(a: Dim, b: Dim) -> bool:
    return canonical(a) == canonical(b)


def substitute(d: Dim, values: Mapping[str, Dim]) -> Dim:
    """``d`` with each symbol named in ``values`` replaced by its value; other symbols stay."""
    out: Dim = 0
    for mono, c in _to_poly(d).items():
        term: Dim = c
        for s in mono:
            term = mul(term, values.get(s, s))
        out = add(out, term)
    return out


def _solvable_symbol(formal: Dim, known: Mapping[str, Dim]) -> tuple[str, int] | None:
    """The one unbound symbol of ``formal`` if it occurs only as a lone term ``±s``."""
    poly = _to_poly(formal)
    unbound = {s for mono in poly for s in mono if s not in known}
    if len(unbound) != 1:
        return None
    (s,) = unbound
    if any(s in mono and mono != (s,) for mono in poly) or abs(poly.get((s,), 0)) != 1:
        return None
    return s, poly[(s,)]


def bind(pairs: Iterable[tuple[Dim, Dim]], defaults: Mapping[str, Dim] | None = None) -> dict[str, Dim]:
    """Binds the symbols of formal dims so that each formal equals its actual dim.

    Actuals are ints (a run) or dims over other symbols (a call's argument types). A plain
    symbol takes its actual; a compound formal with one unbound symbol occurring as a lone
    ``±s`` term (``past+seq`` once ``seq`` is known) is solved for it; a symbol still unbound
    then takes its value in ``defaults`` (for a call: the caller's symbol of the same name);
    then every formal is checked. Raises SymbolicDimError naming the formal that conflicts
    or cannot be bound.
    """
    pairs = [(canonical(f), canonical(a)) for f, a in pairs]
    known: dict[str, Dim] = {}
    for formal, actual in pairs:
        if isinstance(formal, str) and SYMBOL_NAME.match(formal):
            if formal in known and not dims_equal(known[formal], actual):
                raise SymbolicDimError(f"symbol {formal!r} bound to both {known[formal]} and {actual}")
            known[formal] = actual
    progress = True
    while progress:
        progress = False
        for formal, actual in pairs:
            solvable = _solvable_symbol(formal, known)
            if solvable is not None:
                s, coeff = solvable
                rest = substitute(sub(formal, mul(coeff, s)), known)
                value = mul(sub(actual, rest), coeff)
                if isinstance(value, int) and value < 0:
                    raise SymbolicDimError(f"dim {formal} = {actual} needs {s} = {value} < 0")
                known[s] = value
                progress = True
    for formal, actual in pairs:
        for s in symbols(formal) - set(known):
            if defaults is not None and s in defaults:
                known[s] = defaults[s]
        missing = symbols(formal) - set(known)
        if missing:
            raise SymbolicDimError(f"cannot bind symbol {sorted(missing)[0]!r} of dim {formal} from {actual}")
        if not dims_equal(substitute(formal, known), actual):
            raise SymbolicDimError(f"dim {formal} should be {substitute(formal, known)}, got {actual}")
    return known
