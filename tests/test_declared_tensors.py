"""Constants known by name, shape, dtype and sha256 only: parse_module(declared_only=True) and
DeclaredTensorTable, checked against the same modules holding their data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from bitsmith.ir import IRParseError, TensorTable, parse_module, print_module
from bitsmith.ir.declared_tensors import DeclaredTensorTable, TensorDataMismatchError, TensorDataUnavailableError
from bitsmith.ir.graph import sha256_of
from bitsmith.passes import PassManager
from bitsmith.testing.strategies import random_modules

A = np.arange(6, dtype=np.float32).reshape(2, 3)
B = np.array([1, 2], dtype=np.int64)


def text_of(**arrays) -> str:
    lines = ["module {"]
    lines += [f'  tensor "{n}" : {"f32" if a.dtype == np.float32 else "i64"}[{",".join(map(str, a.shape))}] '
              f'sha256 "{sha256_of(a)}"' for n, a in sorted(arrays.items())]
    lines += ["  func @main() {", "    return", "  }", "}"]
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None)
@given(random_modules())
def test_data_free_passes_run_the_same_without_data(case):
    """Printing round-trips, the table equals the one with data, and cse/dce give the same
    module with or without the data (they never read it)."""
    module, _ = case
    text = print_module(module)
    declared = parse_module(text, declared_only=True)
    assert print_module(declared) == text and declared.tensors == module.tensors
    for spec in ("cse", "dce", "cse,dce"):
        assert print_module(PassManager(spec).run(declared)) == print_module(PassManager(spec).run(module))


def test_a_declared_entry_is_there_but_its_data_is_not():
    table = parse_module(text_of(a=A, b=B), declared_only=True).tensors
    assert isinstance(table, DeclaredTensorTable)
    assert "a" in table and "c" not in table and list(table) == ["a", "b"] and len(table) == 2
    assert table.info("a").shape == (2, 3) and table.info("a").sha256 == sha256_of(A)
    with pytest.raises(TensorDataUnavailableError, match="'a'.*f32\\[2,3\\].*--tensors") as e:
        table["a"]
    assert e.value.info.name == "a"
    assert table.nbytes() == A.nbytes + B.nbytes


def test_with_data_checks_each_hash_and_keeps_the_rest_declared():
    table = parse_module(text_of(a=A, b=B), declared_only=True).tensors
    half = table.with_data({"a": A, "unrelated": B})
    assert half.has_data("a") and not half.has_data("b") and "unrelated" not in half
    assert np.array_equal(half["a"], A) and [i.name for i in half.declared()] == ["b"]
    full = half.with_data({"b": B})
    assert full == TensorTable({"a": A, "b": B}) and not full.declared()
    with pytest.raises(TensorDataMismatchError, match="'a' in f.st has sha256"):
        table.with_data({"a": A + 1}, "f.st")
    with pytest.raises(TensorDataMismatchError, match="'b'.*i64\\[3\\].*i64\\[2\\]"):
        table.with_data({"b": np.arange(3)})
    with pytest.raises(TensorDataMismatchError, match="'b'.*no IR dtype"):
        table.with_data({"b": np.zeros(2, np.complex64)})


def test_with_tensors_and_subset_keep_declared_entries():
    table = parse_module(text_of(a=A, b=B), declared_only=True).tensors
    grown = table.with_tensors({"new": B})
    assert list(grown) == ["new", "a", "b"] and grown.has_data("new") and not grown.has_data("a")
    small = grown.subset(["a", "new"])
    assert sorted(small) == ["a", "new"] and [i.name for i in small.declared()] == ["a"]


@pytest.mark.parametrize("line, words", [
    ('tensor "a" : f32[n,3] sha256 "' + "0" * 64 + '"', "static shape"),
    ('tensor "a" : f32[2,3] sha256 "abc"', "64-digit hex"),
])
def test_declared_tensor_lines_are_checked(line, words):
    with pytest.raises(IRParseError, match=words):
        parse_module(f"module {{\n  {line}\n}}\n", declared_only=True)


def test_a_tensor_listed_twice_is_refused():
    text = text_of(a=A).replace("  func", text_of(a=A).splitlines()[1] + "\n  func")
    with pytest.raises(IRParseError, match="listed twice"):
        parse_module(text, declared_only=True)


def test_declared_only_excludes_a_table():
    with pytest.raises(ValueError, match="either"):
        parse_module(text_of(a=A), TensorTable({"a": A}), declared_only=True)


@pytest.mark.parametrize("declared", [False, True])
def test_derived_tables_hash_only_new_arrays(monkeypatch, declared):
    """with_tensors and subset reuse the infos of the arrays they keep (hashing a model's weights
    once per weight rewrite or probe was most of a calibration's fixed cost); the infos equal
    a table built from scratch, and a replaced array is hashed anew."""
    import bitsmith.ir.graph as graph
    base = (parse_module(text_of(b=B), declared_only=True).tensors.with_tensors({"a": A}) if declared
            else TensorTable({"a": A, "b": B}))
    hashed = []
    real = graph.sha256_of
    monkeypatch.setattr(graph, "sha256_of", lambda arr: hashed.append(arr.shape) or real(arr))
    grown = base.with_tensors({"c": B * 2})
    small = grown.subset(["a", "c"])
    replaced = small.with_tensors({"a": A + 1})
    assert hashed == [B.shape, A.shape]  # "c" once, then the new "a"; nothing kept is rehashed
    assert small.infos() == TensorTable({"a": A, "c": B * 2}).infos()
    assert replaced.info("a") == TensorTable({"a": A + 1}).info("a")
