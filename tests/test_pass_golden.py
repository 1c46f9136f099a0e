"""Golden before/after cases of every registered pass (tests/passes/, see its README.md),
compared structurally: value names and the order of independent nodes do not matter."""

from __future__ import annotations

import pytest

from bitsmith.ir import Function, Node, TensorType, Value, parse_module
from bitsmith.passes import PASSES
from golden_passes import GoldenCase, canonical_text, golden_cases, structural_diff

CASES = golden_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_golden_case(case: GoldenCase):
    assert case.file(".after.ir").exists(), f"{case.id}: no {case.name}.after.ir"
    got = case.run()
    diff = structural_diff(case.expected(), got)
    if diff:
        pytest.fail(f"{case.id} ({case.spec}) differs from its .after.ir:\n{diff}", pytrace=False)


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registered_pass_has_a_golden_case(name: str):
    assert name in {c.pass_name for c in CASES}, (
        f"pass {name!r} has no golden case: add tests/passes/{name}/<case>.before.ir and .after.ir "
        f"(see tests/passes/README.md)")


def test_every_case_folder_names_a_registered_pass():
    """A folder named after no pass (a typo, a renamed pass) would otherwise test nothing it claims."""
    assert {c.pass_name for c in CASES} <= set(PASSES)


# ---------------------------------------------------------------- the comparison itself

TEXT = """module {
  func @main(%x: f32[4]) {
    %a = neg(%x) : f32[4]
    %b = exp(%x) : f32[4]
    %c = add(%a, %b) : f32[4]
    return %c
  }
}
"""


def test_canonical_text_ignores_names_and_order_of_independent_nodes():
    renamed = TEXT.replace("%a", "%q").replace("%x", "%in")
    swapped = TEXT.replace("    %a = neg(%x) : f32[4]\n    %b = exp(%x) : f32[4]\n",
                           "    %b = exp(%x) : f32[4]\n    %a = neg(%x) : f32[4]\n")
    assert swapped != TEXT
    want = canonical_text(parse_module(TEXT))
    assert canonical_text(parse_module(renamed)) == want
    assert canonical_text(parse_module(swapped)) == want


@pytest.mark.parametrize("change", [
    ("add(%a, %b)", "add(%b, %a)"),  # operand order is graph shape
    ("neg(%x)", "abs(%x)"),  # op
    ("return %c", "return %a"),  # results
    ("func @main", "func @other"),  # function name
])
def test_canonical_text_sees_structural_changes(change):
    old, new = change
    diff = structural_diff(parse_module(TEXT), parse_module(TEXT.replace(old, new)))
    assert diff.startswith("--- expected (canonical)") and "+" in diff


def test_canonical_text_sees_attribute_values_python_calls_equal():
    def module(value):
        t = TensorType((), "float32")
        fn = Function("main", (), (Node("scalar", (), (Value("s", t),), {"value": value, "dtype": "float32"}),),
                      ("s",))
        from bitsmith.ir import Module
        return Module((fn,))
    assert structural_diff(module(0.0), module(-0.0)) and structural_diff(module(1.0), module(1))
