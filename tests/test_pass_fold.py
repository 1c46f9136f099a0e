"""Constant folding: nodes with all-constant inputs become constants (or scalars)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from bitsmith.errors import PassError
from bitsmith.ir import Function, GraphBuilder, Module, Node, TensorType, Value, evaluate, parse_module, print_module
from bitsmith.passes import ConstantFolding, DeadCodeElimination, get_pass
from bitsmith.testing.strategies import random_modules
from pass_checks import assert_same_results, run_passes

FOLD = ConstantFolding()


def test_folds_constant_subgraph_into_a_new_tensor():
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    w = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    r = b.op("relu", [b.op("mul", [b.constant("w", w), b.scalar(2.0, "float32")])])
    y = b.op("add", [x, r])
    before = b.module([y])

    after = run_passes(before, FOLD)

    fn = after.functions[0]
    assert [n.op for n in fn.nodes] == ["constant", "scalar", "constant", "constant", "add"]
    folded = fn.nodes[3]
    assert folded.outputs == before.function("main").nodes[3].outputs  # same value name and type
    assert folded.attr("name").startswith("folded.")
    np.testing.assert_array_equal(after.tensors[folded.attr("name")], np.maximum(w * 2, 0))

    cleaned = run_passes(after, DeadCodeElimination())
    assert [n.op for n in cleaned.functions[0].nodes] == ["constant", "add"]
    assert list(cleaned.tensors) == [folded.attr("name")]


def test_rank_zero_results_become_scalar_nodes():
    b = GraphBuilder()
    s = b.op("add", [b.scalar(1.5, "float32"), b.scalar(2.0, "float32")])
    total = b.op("sum", [b.constant("c", np.arange(4, dtype=np.int32))], {"axes": (0,), "keepdims": False})
    after = run_passes(b.module([s, total]), FOLD)
    by_name = {n.outputs[0].name: n for n in after.functions[0].nodes}
    assert (by_name[s].op, by_name[s].attr("value"), by_name[s].attr("dtype")) == ("scalar", 3.5, "float32")
    assert (by_name[total].op, by_name[total].attr("value"), by_name[total].attr("dtype")) == ("scalar", 6, "int32")


def _expand_module(shape):
    b = GraphBuilder()
    e = b.op("expand", [b.constant("one", np.ones(1, np.float32))], {"shape": shape})
    return b.module([e])


def test_respects_max_elements():
    module = _expand_module((1000,))
    assert run_passes(module, get_pass("fold", max_elements=100)) == module
    assert run_passes(module, FOLD).functions[0].nodes[1].op == "constant"


def test_never_folds_symbolic_shapes():
    b = GraphBuilder()
    x = b.param("x", TensorType(("seq",), "float32"))
    e = b.op("expand", [b.constant("one", np.ones(1, np.float32))], {"shape": ("seq",)})
    module = b.module([b.op("add", [x, e])])
    assert run_passes(module, FOLD) == module


def test_folded_names_are_deterministic_and_shared():
    b = GraphBuilder()
    c = b.constant("c", np.arange(6, dtype=np.float32).reshape(2, 3))
    n1, n2 = b.op("neg", [c]), b.op("neg", [c])
    after = run_passes(b.module([n1, n2]), FOLD)
    names = [n.attr("name") for n in after.functions[0].nodes[1:]]
    assert names[0] == names[1] and len(after.tensors) == 2
    assert run_passes(b.module([n1, n2]), FOLD) == after


@pytest.mark.parametrize("op", ["exp", "log", "reciprocal"])
def test_folds_nan_and_inf_exactly(op):
    b = GraphBuilder()
    y = b.op(op, [b.constant("c", np.array([-1.0, 0.0, -0.0, 1e30], np.float32))])
    module = b.module([y])
    with np.errstate(all="ignore"):
        want = evaluate(module, [])
    after = run_passes(module, FOLD)
    assert after.functions[0].nodes[1].op == "constant"
    assert after.tensors[after.functions[0].nodes[1].attr("name")].tobytes() == want[0].tobytes()


# Exact (bitwise) comparison: folding runs the interpreter's own numpy rules on the same
# arrays it would see at run time, so the same kernels produce the same bits.
@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_preserves_results_exactly_and_is_idempotent(case):
    module, args = case
    after = run_passes(module, FOLD)
    assert_same_results(module, after, args)
    assert run_passes(after, FOLD) == after
    assert_same_results(module, run_passes(after, DeadCodeElimination()), args)


def _declared_only(module):
    """The module as `bitsmith opt` sees it without --tensors: constants by name, shape, hash."""
    return parse_module(print_module(module), declared_only=True)


@pytest.mark.parametrize("constant_first", [True, False])
def test_reads_no_constant_data_unless_it_folds_a_user(constant_first):
    """Operand order does not decide whether fold reads a constant: mul(w, x) and mul(x, w)
    fold nothing and need no data; relu(w) folds and needs w's."""
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    w = b.constant("w", np.ones((2, 3), np.float32))
    y = b.op("mul", [w, x] if constant_first else [x, w])
    unfoldable = b.module([y])
    assert run_passes(_declared_only(unfoldable), FOLD) == _declared_only(unfoldable)
    b2 = GraphBuilder()
    foldable = b2.module([b2.op("relu", [b2.constant("w", np.ones((2, 3), np.float32))])])
    with pytest.raises(PassError, match="TensorDataUnavailableError"):
        run_passes(_declared_only(foldable), FOLD)


def test_never_folds_a_call():
    """call is not PURE (its callee decides), so fold leaves it though its inputs are known."""
    b = GraphBuilder()
    two = b.scalar(2.0, "float32")
    callee = Function("f", (Value("a", TensorType((), "float32")),),
                      (Node("exp", ("a",), (Value("e", TensorType((), "float32")),)),), ("e",))
    main = b.module([two]).functions[0]
    out = Value("r", TensorType((), "float32"))
    main = main.replace(nodes=main.nodes + (Node("call", (two,), (out,), {"callee": "f"}),), results=("r",))
    module = Module((main, callee))
    after = run_passes(module, FOLD)
    assert [n.op for n in after.function("main").nodes] == ["scalar", "call"]
    np.testing.assert_array_equal(evaluate(after, [])[0], np.float32(np.exp(2.0)))  # exp rounded once
