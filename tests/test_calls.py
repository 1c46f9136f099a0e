"""Calls between the functions of a module: text form, verifier, interpreter, symbol binding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from bitsmith.ir import (Function, IRParseError, InterpreterError, Module, VerificationError, evaluate,
                         parse_module, print_module, run_function, verify_module)
from bitsmith.ir import symbolic as sym
from bitsmith.ir.traits import CALL, PURE, has_trait
from bitsmith.ir.verifier import verify_function
from bitsmith.testing.strategies import modules_with_calls
from pass_checks import assert_bitwise_equal

TEXT = """\
module {
  func @main(%x: f32[batch,seq,4], %past: f32[batch,past,4]) {
    %k = concat(%past, %x) {axis = 1} : f32[batch,past+seq,4]
    %a, %b = call(%x, %k) {callee = "sub"} : f32[batch,seq,4], f32[batch,past+seq,4]
    return %a, %b
  }
  func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) attrs {device = "attention", lanes = 4} {
    %y = neg(%q) : f32[b,s,4]
    %z = abs(%kv) : f32[b,s+t,4]
    return %y, %z
  }
}
"""


def _module(text: str = TEXT) -> Module:
    return parse_module(text)


def test_text_round_trip_with_function_attributes():
    m = _module()
    assert m.function("sub").attrs == (("device", "attention"), ("lanes", 4))
    assert m.function("sub").attr("device") == "attention" and m.function("main").attr("device") is None
    assert print_module(m) == TEXT
    verify_module(m)


def test_function_attrs_are_frozen_and_sorted():
    fn = Function("f", (), (), (), {"z": [1, 2], "a": "x"})
    assert fn.attrs == (("a", "x"), ("z", (1, 2)))
    assert fn.replace(attrs={"b": 1}).attrs == (("b", 1),)


@pytest.mark.parametrize("bad, match", [
    ("func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) attrs device {", r"expected '\{'"),
    ("func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) attrs {device = } {", "attribute value"),
    ("func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) {device = 1} {", "a node"),
    ("func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) attrs {a = 1, a = 2} {", "repeated"),
])
def test_function_attribute_parse_errors(bad, match):
    with pytest.raises(IRParseError, match=match):
        parse_module(TEXT.replace('func @sub(%q: f32[b,s,4], %kv: f32[b,s+t,4]) attrs {device = "attention", lanes = 4} {',
                                  bad))


def test_call_op_is_registered_with_the_call_trait():
    assert has_trait("call", CALL) and not has_trait("call", PURE)


def test_interpreter_runs_the_callee_and_binds_its_symbols():
    m = _module()
    rng = np.random.default_rng(0)
    x, past = rng.uniform(-1, 1, (2, 1, 4)).astype(np.float32), rng.uniform(-1, 1, (2, 3, 4)).astype(np.float32)
    a, b = evaluate(m, [x, past])
    assert_bitwise_equal([a, b], [-x, np.abs(np.concatenate([past, x], axis=1))])
    seen = []
    run_function(m, "main", [x, past], observe=lambda node, outs: seen.append(node.op))
    assert seen == ["concat", "neg", "abs", "call"]  # the callee's nodes are observed too


def test_overrides_reach_the_callee():
    m = _module()
    x, past = np.ones((1, 1, 4), np.float32), np.ones((1, 0, 4), np.float32)
    a, _ = run_function(m, "main", [x, past], overrides={"neg": lambda xs, node, ctx: [xs[0] * 7]})
    assert_bitwise_equal([a], [x * 7])


def test_callee_inherits_symbols_its_arguments_do_not_bind():
    """A parameter f32[batch*seq,4] binds neither symbol; the caller's batch and seq apply,
    including inside the callee's reshape."""
    text = """\
module {
  func @main(%x: f32[batch,seq,4]) {
    %f = reshape(%x) {shape = ("batch*seq", 4)} : f32[batch*seq,4]
    %y = call(%f) {callee = "g"} : f32[batch,seq,4]
    return %y
  }
  func @g(%f: f32[batch*seq,4]) {
    %n = neg(%f) : f32[batch*seq,4]
    %r = reshape(%n) {shape = ("batch", "seq", 4)} : f32[batch,seq,4]
    return %r
  }
}
"""
    m = verify_module(parse_module(text))
    assert print_module(m) == text
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert_bitwise_equal(evaluate(m, [x]), [-x])


def test_a_call_binds_a_callee_symbol_to_a_constant():
    text = TEXT.replace("f32[batch,seq,4], %past", "f32[batch,1,4], %past").replace(
        "f32[batch,past+seq,4]", "f32[batch,past+1,4]").replace(": f32[batch,seq,4], f32", ": f32[batch,1,4], f32")
    m = verify_module(parse_module(text))
    x, past = np.ones((1, 1, 4), np.float32), np.ones((1, 2, 4), np.float32)
    assert [a.shape for a in evaluate(m, [x, past])] == [(1, 1, 4), (1, 3, 4)]


# ---------------------------------------------------------------- verifier errors

CALL_LINE = '    %a, %b = call(%x, %k) {callee = "sub"} : f32[batch,seq,4], f32[batch,past+seq,4]\n'


def _reject(text: str, match: str) -> None:
    with pytest.raises(VerificationError, match=match):
        verify_module(parse_module(text))


@pytest.mark.parametrize("line, match", [
    ('    %a, %b = call(%x, %k) {callee = "nope"} : f32[batch,seq,4], f32[batch,past+seq,4]\n',
     r"function 'main', node %a, %b = call: callee 'nope' is not a function of the module \(it has \['main', 'sub'\]\)"),
    ('    %a, %b = call(%x, %k) {callee = 3} : f32[batch,seq,4], f32[batch,past+seq,4]\n', "callee 3 is not a function"),
    ('    %a, %b = call(%x, %k) : f32[batch,seq,4], f32[batch,past+seq,4]\n', r"misses attributes \['callee'\]"),
    ('    %a, %b = call(%x, %k) {callee = "sub", device = 1} : f32[batch,seq,4], f32[batch,past+seq,4]\n',
     r"unknown attributes \['device'\]"),
    ('    %a, %b = call(%x) {callee = "sub"} : f32[batch,seq,4], f32[batch,past+seq,4]\n',
     r"@sub takes 2 arguments \(%q, %kv\), the call passes 1"),
    ('    %a, %b = call(%k, %k) {callee = "sub"} : f32[batch,seq,4], f32[batch,past+seq,4]\n',
     # q binds s = past+seq, so kv's s+t = past+seq binds t = 0
     r"declared type f32\[batch,seq,4\], f32\[batch,past\+seq,4\] but the op infers f32\[batch,past\+seq,4\], "
     r"f32\[batch,past\+seq,4\]"),
    ('    %a = call(%x, %k) {callee = "sub"} : f32[batch,seq,4]\n', "the call has 1 outputs but @sub returns 2 results"),
    ('    %a, %b = call(%x, %k) {callee = "sub"} : f32[batch,seq,4], f16[batch,past+seq,4]\n', "declared type"),
])
def test_call_errors_name_function_node_and_reason(line, match):
    _reject(TEXT.replace(CALL_LINE, line).replace("return %a, %b", "return %a" if line.count("%") == 5 else "return %a, %b"),
            match)


def test_argument_dtype_and_rank_must_match():
    _reject(TEXT.replace("%q: f32[b,s,4]", "%q: f16[b,s,4]").replace("%y = neg(%q) : f32", "%y = neg(%q) : f16"),
            r"argument 0 is f32\[batch,seq,4\] but @sub's parameter %q is f16\[b,s,4\]")
    _reject(TEXT.replace("%q: f32[b,s,4]", "%q: f32[b,4]").replace("%y = neg(%q) : f32[b,s,4]", "%y = neg(%q) : f32[b,4]"),
            r"argument 0 is f32\[batch,seq,4\] but @sub's parameter %q is f32\[b,4\]")


def test_symbols_bound_twice_differently():
    text = TEXT.replace("%kv: f32[b,s+t,4]", "%kv: f32[s,s+t,4]").replace("%z = abs(%kv) : f32[b,s+t,4]",
                                                                          "%z = abs(%kv) : f32[s,s+t,4]")
    _reject(text, r"do not fit @sub's parameters: symbol 's' bound to both seq and batch")


def test_static_dims_must_agree():
    text = TEXT.replace("%q: f32[b,s,4]", "%q: f32[b,s,5]").replace("%y = neg(%q) : f32[b,s,4]", "%y = neg(%q) : f32[b,s,5]")
    _reject(text, r"do not fit @sub's parameters: dim 5 should be 5, got 4")


def test_callee_result_must_be_defined():
    _reject(TEXT.replace("return %y, %z", "return %y, %w"), "function 'sub': result %w is not defined")


def test_callee_returning_nothing_cannot_be_called():
    text = TEXT.replace("    return %y, %z\n", "    return\n")
    _reject(text, "@sub returns nothing")


RECURSIVE = """\
module {
  func @main(%x: f32[4]) {
    %y = call(%x) {callee = "f"} : f32[4]
    return %y
  }
  func @f(%x: f32[4]) {
    %y = call(%x) {callee = "g"} : f32[4]
    return %y
  }
  func @g(%x: f32[4]) {
    %y = call(%x) {callee = "CALLEE"} : f32[4]
    return %y
  }
}
"""


@pytest.mark.parametrize("callee, cycle", [("g", r"g -> g"), ("f", r"f -> g -> f"), ("main", r"main -> f -> g -> main")])
def test_recursion_is_refused(callee, cycle):
    _reject(RECURSIVE.replace("CALLEE", callee), rf"function 'g', node %y = call: recursion \({cycle}\) is not allowed")


def test_a_call_cannot_be_checked_without_its_module():
    with pytest.raises(VerificationError, match="verify the whole module"):
        verify_function(_module().function("main"))


def test_interpreter_refuses_arrays_that_break_the_callees_dims():
    text = TEXT.replace("%kv: f32[b,s+t,4]", "%kv: f32[b,t,4]").replace("%z = abs(%kv) : f32[b,s+t,4]",
                                                                         "%z = abs(%kv) : f32[b,t,4]")
    m = verify_module(parse_module(text))  # t binds to past+seq
    with pytest.raises(InterpreterError, match="takes 2 inputs"):
        run_function(m, "sub", [np.ones((1, 1, 4), np.float32)])


# ---------------------------------------------------------------- symbolic binding

@pytest.mark.parametrize("pairs, defaults, want", [
    ([("seq", 3), ("past+seq", 7)], None, {"seq": 3, "past": 4}),
    ([("past+seq", 7), ("seq", 3)], None, {"seq": 3, "past": 4}),  # order does not matter
    ([("s", "seq"), ("t+s", "past+seq")], None, {"s": "seq", "t": "past"}),
    ([("batch*seq", 6)], {"batch": 2, "seq": 3}, {"batch": 2, "seq": 3}),
    ([("n-1", 4)], None, {"n": 5}),
    ([("2-n", 0)], None, {"n": 2}),
])
def test_bind(pairs, defaults, want):
    assert sym.bind(pairs, defaults) == want


@pytest.mark.parametrize("pairs, match", [
    ([("seq", 3), ("seq", 4)], "bound to both 3 and 4"),
    ([("batch*seq", 6)], "cannot bind symbol 'batch'"),
    ([("2*n", 6)], "cannot bind symbol 'n'"),
    ([("seq", 3), ("past+seq", 2)], "needs past = -1 < 0"),
    ([("seq", 3), ("seq+1", 5)], "should be 4, got 5"),
])
def test_bind_errors(pairs, match):
    with pytest.raises(sym.SymbolicDimError, match=match):
        sym.bind(pairs)


# ---------------------------------------------------------------- random modules with calls

@settings(max_examples=60, deadline=None)
@given(modules_with_calls())
def test_random_modules_with_calls_round_trip_verify_and_compute_the_same(sample):
    with_calls, original, args = sample
    text = print_module(with_calls)
    parsed = parse_module(text, with_calls.tensors)
    assert parsed == with_calls and print_module(parsed) == text
    verify_module(parsed)
    with np.errstate(all="ignore"):
        assert_bitwise_equal(evaluate(with_calls, args), evaluate(original, args))
