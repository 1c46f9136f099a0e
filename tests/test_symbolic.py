"""Symbolic dims against plain integer arithmetic, the oracle for every property here."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import symbolic as sym
from bitsmith.ir.symbolic import SymbolicDimError

SYMBOLS = ("batch", "seq", "past", "h_2")

# A polynomial as a list of terms (coefficient, factors); its meaning is computed directly.
terms = st.lists(st.tuples(st.integers(-5, 5), st.lists(st.sampled_from(SYMBOLS), max_size=3)), max_size=4)
bindings = st.fixed_dictionaries({s: st.integers(-7, 7) for s in SYMBOLS})


def term_text(coeff: int, factors: list[str]) -> str:
    return "*".join([str(abs(coeff))] + factors)


def poly_text(ts: list[tuple[int, list[str]]]) -> str:
    """Writes terms in the given order, with explicit coefficients: "3*seq*batch-0*past+2"."""
    text = "".join(("-" if c < 0 else "+") + term_text(c, f) for c, f in ts)
    return text.lstrip("+") or "0"


def value(ts: list[tuple[int, list[str]]], env: dict[str, int]) -> int:
    total = 0
    for c, factors in ts:
        for f in factors:
            c *= env[f]
        total += c
    return total


@settings(max_examples=200, deadline=None)
@given(terms, bindings)
def test_parse_and_evaluate_match_integers(ts, env) -> None:
    assert sym.evaluate(poly_text(ts), env) == value(ts, env)
    assert sym.evaluate(sym.canonical(poly_text(ts)), env) == value(ts, env)


@settings(max_examples=200, deadline=None)
@given(terms, st.randoms(use_true_random=False))
def test_canonical_form_ignores_term_and_factor_order(ts, rnd) -> None:
    shuffled = [(c, rnd.sample(f, len(f))) for c, f in ts]
    rnd.shuffle(shuffled)
    a, b = sym.canonical(poly_text(ts)), sym.canonical(poly_text(shuffled))
    assert a == b
    assert sym.canonical(a) == a  # idempotent
    assert sym.dims_equal(poly_text(ts), poly_text(shuffled))


@settings(max_examples=200, deadline=None)
@given(terms, terms, bindings)
def test_add_sub_mul_agree_with_integers(t1, t2, env) -> None:
    a, b = sym.canonical(poly_text(t1)), sym.canonical(poly_text(t2))
    x, y = value(t1, env), value(t2, env)
    assert sym.evaluate(sym.add(a, b), env) == x + y
    assert sym.evaluate(sym.sub(a, b), env) == x - y
    assert sym.evaluate(sym.mul(a, b), env) == x * y
    assert sym.evaluate(sym.product((a, b, a)), env) == x * y * x
    assert sym.add(a, b) == sym.add(b, a) and sym.mul(a, b) == sym.mul(b, a)
    assert sym.sub(a, a) == 0


@settings(max_examples=200, deadline=None)
@given(terms)
def test_canonical_is_int_exactly_when_constant(ts) -> None:
    c = sym.canonical(poly_text(ts))
    assert sym.is_static(c) == (not sym.symbols(c))
    # an int result is the constant's value; a symbolic result names only drawn symbols
    assert sym.symbols(c) <= {f for _, fs in ts for f in fs}
    if isinstance(c, int):
        assert c == value(ts, dict.fromkeys(SYMBOLS, 0))


@settings(max_examples=200, deadline=None)
@given(terms, terms)
def test_distinct_canonical_forms_are_distinct_polynomials(t1, t2) -> None:
    # Two polynomials that agree on a 5^4 grid of bindings are equal (degree <= 3 per
    # symbol), so canonical equality must coincide with agreement on the grid.
    a, b = sym.canonical(poly_text(t1)), sym.canonical(poly_text(t2))
    grid = [dict(zip(SYMBOLS, (i, j, k, m))) for i in range(5) for j in range(5)
            for k in range(5) for m in range(5)]
    agree = all(value(t1, env) == value(t2, env) for env in grid)
    assert (a == b) == agree


@pytest.mark.parametrize("text, expected", [
    ("seq+past", "past+seq"), ("seq*batch", "batch*seq"), ("2*seq-1", "2*seq-1"),
    ("1+seq", "seq+1"), ("seq-seq", 0), ("3", 3), ("-seq+2*seq", "seq"), ("seq*seq*2", "2*seq*seq"),
    ("4-seq", "-seq+4"), (7, 7), ("  seq  +  past ", "past+seq"),
])
def test_canonical_examples(text, expected) -> None:
    assert sym.canonical(text) == expected


@pytest.mark.parametrize("bad", ["seq+", "*seq", "seq seq", "seq/2", "(seq)", "", "2 3", True, 1.5])
def test_malformed_dims_raise(bad) -> None:
    with pytest.raises(SymbolicDimError):
        sym.canonical(bad)


def test_unbound_symbol_names_it() -> None:
    with pytest.raises(SymbolicDimError, match="'past'"):
        sym.evaluate("past+seq", {"seq": 3})
