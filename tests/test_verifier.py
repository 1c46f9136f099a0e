"""The verifier accepts built modules and rejects each kind of ill-formed one, saying why."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import (GraphBuilder, Location, Module, Node, TensorTable, TensorType, Value,
                         VerificationError, verify_module)
from bitsmith.testing.strategies import random_modules


def _module() -> Module:
    b = GraphBuilder("main")
    x = b.param("x", TensorType(("batch", 4), "float32"))
    w = b.constant("layers.0.w", np.ones((3, 4), np.float32))
    h = b.op("linear", [x, w], loc=Location("layers.0", "model.py:10"))
    y = b.op("softmax", [h], {"axis": -1})
    return b.module([y])


def _with_nodes(m: Module, nodes) -> Module:
    return m.with_function(m.functions[0].replace(nodes=tuple(nodes)))


def _reject(m: Module, pattern: str) -> None:
    with pytest.raises(VerificationError, match=pattern):
        verify_module(m)


def test_valid_module_passes() -> None:
    assert verify_module(_module()) == _module()


@settings(max_examples=40, deadline=None)
@given(random_modules())
def test_random_modules_verify(module_and_args) -> None:
    verify_module(module_and_args[0])


def test_use_before_def() -> None:
    m = _module()
    n = m.functions[0].nodes
    _reject(_with_nodes(m, [n[0], n[2], n[1]]), r"node %v2 = softmax: operand %v1 is not defined before use")


def test_redefinition() -> None:
    m = _module()
    n = m.functions[0].nodes
    again = n[2].replace(outputs=(Value("v1", n[2].output.type),))
    _reject(_with_nodes(m, [n[0], n[1], again]), r"value %v1 defined twice")
    fn = m.functions[0]
    _reject(m.with_function(fn.replace(params=fn.params * 2)), r"parameter %x defined twice")


def test_wrong_declared_type() -> None:
    m = _module()
    n = m.functions[0].nodes
    bad = n[1].replace(outputs=(Value("v1", TensorType(("batch", 4), "float32")),))
    _reject(_with_nodes(m, [n[0], bad, n[2]]), r"declared type f32\[batch,4\] but the op infers f32\[batch,3\]")


def test_constant_type_vs_table() -> None:
    m = _module()
    n = m.functions[0].nodes
    bad = n[0].replace(outputs=(Value("v0", TensorType((4, 3), "float32")),))
    _reject(_with_nodes(m, [bad] + list(n[1:])), r"declared type f32\[4,3\] but the table holds float32\[3, 4\]")
    _reject(m.replace(tensors=TensorTable()), r"tensor 'layers.0.w' is not in the tensor table")


def test_unknown_op() -> None:
    m = _module()
    n = m.functions[0].nodes
    _reject(_with_nodes(m, [n[0], n[1], n[2].replace(op="softermax")]), r"unknown op 'softermax'")


def test_missing_and_unknown_attrs() -> None:
    m = _module()
    n = m.functions[0].nodes
    _reject(_with_nodes(m, [n[0], n[1], n[2].replace(attrs={})]), r"softmax misses attributes \['axis'\]")
    _reject(_with_nodes(m, [n[0], n[1], n[2].replace(attrs={"axis": -1, "dim": 0})]),
            r"softmax has unknown attributes \['dim'\]")


def test_bad_broadcast() -> None:
    b = GraphBuilder()
    x = b.param("x", TensorType(("batch", 4), "float32"))
    y = b.param("y", TensorType(("batch", 3), "float32"))
    m = b.module([x])
    node = Node("add", (x, y), (Value("z", TensorType(("batch", 4), "float32")),))
    _reject(_with_nodes(m, [node]), r"do not broadcast \(dim -1: 4 vs 3\)")
    # symbolic dims broadcast only when equal as polynomials
    z = b.param("z", TensorType(("seq", 4), "float32"))
    node = Node("add", (x, z), (Value("w", TensorType(("batch", 4), "float32")),))
    _reject(_with_nodes(b.module([x]), [node]), r"do not broadcast \(dim -2: batch vs seq\)")


def test_wrong_arity_and_undefined_result() -> None:
    m = _module()
    n = m.functions[0].nodes
    _reject(_with_nodes(m, [n[0], n[1], n[2].replace(inputs=("v1", "v1"))]), r"softmax takes 1..1 inputs, got 2")
    _reject(m.with_function(m.functions[0].replace(results=("nope",))), r"result %nope is not defined")


def test_error_names_location() -> None:
    m = _module()
    n = m.functions[0].nodes
    _reject(_with_nodes(m, [n[0], n[1].replace(inputs=("x", "v9")), n[2]]),
            r"function 'main', node %v1 = linear \(layers.0 at model.py:10\): operand %v9")


@settings(max_examples=40, deadline=None)
@given(random_modules(), st.data())
def test_any_changed_dtype_is_caught(module_and_args, data) -> None:
    m = module_and_args[0]
    nodes = list(m.functions[0].nodes)
    i = data.draw(st.integers(0, len(nodes) - 1))
    out = nodes[i].outputs[0]
    wrong = "float16" if out.type.dtype != "float16" else "float32"
    nodes[i] = nodes[i].replace(outputs=(Value(out.name, TensorType(out.type.shape, wrong)),))
    with pytest.raises(VerificationError, match="declared type"):
        verify_module(_with_nodes(m, nodes))


@pytest.mark.parametrize("op, attrs", [
    ("sum", {"axes": (0,), "keepdims": False}), ("softmax", {"axis": 0}), ("concat", {"axis": 0}),
    ("slice", {"axis": 0, "start": 0, "end": 1, "step": 1}),
])
def test_axis_ops_reject_rank_zero(op: str, attrs: dict) -> None:
    # regression: these verified (or crashed the verifier with IndexError), then failed to run
    b = GraphBuilder()
    x = b.param("x", TensorType((), "float32"))
    node = Node(op, (x,), (Value("y", TensorType((), "float32")),), attrs)
    _reject(_with_nodes(b.module([x]), [node]), r"axis 0 out of range for rank 0")


def test_reduce_rejects_repeated_axis() -> None:
    # regression: axes (1, -2) on rank 3 verified, then numpy refused the duplicate axis
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3, 4), "float32"))
    node = Node("sum", (x,), (Value("y", TensorType((2,), "float32")),), {"axes": (1, -2), "keepdims": False})
    _reject(_with_nodes(b.module([x]), [node]), r"sum: axes \(1, -2\) name an axis twice")
