"""The IR text form: print/parse round trips, a golden example, and parse errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import (Function, GraphBuilder, IRParseError, Location, Module, Node, TensorTable,
                         TensorType, Value, parse_module, print_module)
from bitsmith.ir.symbolic import add, mul
from bitsmith.testing.strategies import random_modules

# ---------------------------------------------------------------- golden example


def _small_module() -> Module:
    b = GraphBuilder("main")
    ids = b.param("input_ids", TensorType(("batch", "seq"), "int64"))
    table = b.constant("model.embed_tokens.weight", np.arange(6, dtype=np.float32).reshape(3, 2))
    h = b.op("embedding", [table, ids], loc=Location("model.embed_tokens", "modeling_llama.py:123"))
    s = b.op("softmax", [h], {"axis": -1})
    return b.module([h, s], {"kind": "causal_lm", "num_layers": 30, "eps": 1e-05})


GOLDEN = """\
module attrs {eps = 1e-05, kind = "causal_lm", num_layers = 30} {
  tensor "model.embed_tokens.weight" : f32[3,2] sha256 "%s"
  func @main(%%input_ids: i64[batch,seq]) {
    %%v0 = constant() {name = "model.embed_tokens.weight"} : f32[3,2]
    %%v1 = embedding(%%v0, %%input_ids) : f32[batch,seq,2] loc("model.embed_tokens", "modeling_llama.py:123")
    %%v2 = softmax(%%v1) {axis = -1} : f32[batch,seq,2]
    return %%v1, %%v2
  }
}
"""


def test_golden_text() -> None:
    m = _small_module()
    expected = GOLDEN % m.tensors.info("model.embed_tokens.weight").sha256
    assert print_module(m) == expected
    assert parse_module(expected, m.tensors) == m


# ---------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_round_trip_random_graphs(module_and_args) -> None:
    module, _ = module_and_args
    text = print_module(module)
    parsed = parse_module(text, module.tensors)
    assert parsed == module
    assert print_module(parsed) == text


# Arbitrary (unverified) modules stress the lexical side: odd names, nested attribute values,
# extreme floats, symbolic dims, multi-output nodes, locations with quotes and newlines.
odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8)
floats = st.floats(allow_nan=False)  # NaN != NaN would defeat dataclass equality
attr_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | floats | odd_text,
    lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=8)
attr_dicts = st.dictionaries(odd_text, attr_values, max_size=3).map(lambda d: tuple(sorted(d.items())))
symbols = st.sampled_from(["batch", "seq", "past", "n_1"])
dims = st.recursive(st.integers(0, 9) | symbols,
                    lambda inner: st.builds(add, inner, inner) | st.builds(mul, inner, inner), max_leaves=4)
types = st.builds(TensorType, st.lists(dims, max_size=3).map(tuple),
                  st.sampled_from(["float32", "float16", "int64", "bool", "uint8"]))
names = st.sampled_from(["x", "v0", "a.b", "%q", "1-2"]) | odd_text.filter(bool)


@st.composite
def odd_modules(draw: st.DrawFn) -> Module:
    params = tuple(Value(n, draw(types)) for n in draw(st.lists(names, max_size=3)))
    nodes = tuple(
        Node(draw(st.sampled_from(["add", "split", "my_op"])), tuple(draw(st.lists(names, max_size=3))),
             tuple(Value(n, draw(types)) for n in draw(st.lists(names, min_size=1, max_size=3))),
             draw(attr_dicts), draw(st.none() | st.builds(Location, odd_text, odd_text)))
        for _ in range(draw(st.integers(0, 4))))
    fn = Function(draw(names), params, nodes, tuple(draw(st.lists(names, max_size=2))))
    return Module((fn,), TensorTable(), draw(attr_dicts))


@settings(max_examples=150, deadline=None)
@given(odd_modules())
def test_round_trip_odd_names_and_attrs(module: Module) -> None:
    text = print_module(module)
    parsed = parse_module(text)
    assert parsed == module
    assert print_module(parsed) == text


def _float_attr(v: float) -> float:
    m = Module((), attrs=(("v", v),))
    return parse_module(print_module(m)).attr("v")


@pytest.mark.parametrize("v", [0.1, -0.0, 1e-310, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, 1 / 3])
def test_floats_round_trip_bit_exactly(v: float) -> None:
    out = _float_attr(v)
    assert isinstance(out, float) and math.copysign(1, out) == math.copysign(1, v) and out == v


def test_nan_and_int_float_bool_distinct() -> None:
    assert math.isnan(_float_attr(math.nan))
    m = Module((), attrs=(("a", 1), ("b", 1.0), ("c", True), ("d", "1")))
    back = dict(parse_module(print_module(m)).attrs)
    assert [type(back[k]) for k in "abcd"] == [int, float, bool, str]


# ---------------------------------------------------------------- errors


def _text_and_table() -> tuple[str, TensorTable]:
    m = _small_module()
    return print_module(m), m.tensors


def test_sha256_mismatch_names_tensor() -> None:
    text, _ = _text_and_table()
    other = TensorTable({"model.embed_tokens.weight": np.ones((3, 2), np.float32)})
    with pytest.raises(IRParseError, match=r"line 2: tensor 'model\.embed_tokens\.weight': sha256"):
        parse_module(text, other)


def test_shape_and_dtype_mismatch() -> None:
    text, _ = _text_and_table()
    with pytest.raises(IRParseError, match=r"text says f32\[3,2\] but the table holds f32\[2,3\]"):
        parse_module(text, TensorTable({"model.embed_tokens.weight": np.zeros((2, 3), np.float32)}))
    with pytest.raises(IRParseError, match=r"table holds f64\[3,2\]"):
        parse_module(text, TensorTable({"model.embed_tokens.weight": np.zeros((3, 2), np.float64)}))


def test_missing_tensor() -> None:
    text, _ = _text_and_table()
    with pytest.raises(IRParseError, match=r"'model\.embed_tokens\.weight' is not in the given tensor table"):
        parse_module(text, TensorTable({"other": np.zeros(1, np.float32)}))
    with pytest.raises(IRParseError, match="pass the TensorTable"):
        parse_module(text)


def test_extra_table_entries_are_dropped() -> None:
    text, table = _text_and_table()
    bigger = table.with_tensors({"unused": np.zeros(2, np.float32)})
    assert parse_module(text, bigger).tensors == table


@pytest.mark.parametrize("line, message", [
    ("    %v2 = softmax(%v1 {axis = -1} : f32[batch,seq,2]", r"line 6: expected ',' or '\)', got '\{'"),
    ("    %v2 = softmax(%v1) {axis = } : f32[batch,seq,2]", r"line 6: expected an attribute value"),
    ("    %v2 = softmax(%v1) {axis = -1}", r"line 7: expected ':' and the output types, got 'return'"),
    ("    %v2 = softmax(%v1) {axis = -1} : q32[batch,seq,2]", r"line 6: unknown dtype 'q32'"),
    ("    %v2 = softmax(%v1) {axis = -1} : f32[batch,seq/2,2]", r"line 6: bad character '/'"),
    ("    %v2 = softmax(%v1) {axis = -1} : f32[batch,seq,2] ?", r"line 6: unexpected character '\?'"),
    ("    %v2, %v3 = softmax(%v1) {axis = -1} : f32[batch,seq,2]", r"line 6: 2 outputs but 1 types"),
    ("    softmax(%v1)", r"line 6: expected a node .* or 'return', got 'softmax'"),
])
def test_malformed_line(line: str, message: str) -> None:
    text, table = _text_and_table()
    lines = text.splitlines()
    assert lines[5].startswith("    %v2 = softmax")
    lines[5] = line
    with pytest.raises(IRParseError, match=message):
        parse_module("\n".join(lines), table)


def test_truncated_text() -> None:
    text, table = _text_and_table()
    with pytest.raises(IRParseError, match=r"expected 'func', 'tensor' or '\}', got end of text"):
        parse_module(text.rstrip().rstrip("}"), table)
