"""CSE: merges nodes with equal op, inputs, attributes and output types."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

from bitsmith.ir import GraphBuilder, Location, TensorType
from bitsmith.passes import CommonSubexpressionElimination
from bitsmith.passes.cse import _node_key
from bitsmith.testing.strategies import random_modules
from pass_checks import assert_same_results, run_passes

CSE = CommonSubexpressionElimination()


def test_merges_duplicates_and_renames_uses():
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    a1 = b.op("relu", [x], loc=Location("layer.0", "model.py:1"))
    a2 = b.op("relu", [x], loc=Location("layer.1", "model.py:2"))
    s = b.op("add", [a1, a2])
    w = np.ones((2, 3), np.float32)
    k1, k2 = b.constant("w", w), b.constant("w", w)
    m1, m2 = b.op("mul", [k1, x]), b.op("mul", [k2, x])  # equal once k2 is renamed to k1
    before = b.module([s, m2])

    after = run_passes(before, CSE)

    fn = after.functions[0]
    assert [n.op for n in fn.nodes] == ["relu", "add", "constant", "mul"]
    assert fn.nodes[0].loc == Location("layer.0", "model.py:1")  # the first occurrence stays
    assert fn.nodes[1].inputs == (a1, a1)
    assert fn.results == (s, m1)


def test_does_not_merge_values_that_differ():
    b = GraphBuilder()
    x = b.param("x", TensorType((3,), "float32"))
    outs = [b.op("gelu", [x], {"approximate": "none"}), b.op("gelu", [x], {"approximate": "tanh"}),
            b.scalar(0.0, "float32"), b.scalar(-0.0, "float32"),  # equal in Python, not in 1/x
            b.op("sum", [x], {"axes": (0,), "keepdims": True}),
            b.op("sum", [x], {"axes": (0,), "keepdims": False})]
    before = b.module(outs)
    assert run_passes(before, CSE) == before


@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_preserves_results_exactly_and_is_idempotent(case):
    module, args = case
    after = run_passes(module, CSE)
    assert_same_results(module, after, args)  # bitwise: CSE reuses values, it computes nothing new
    assert run_passes(after, CSE) == after
    keys = [_node_key(n) for n in after.functions[0].nodes]
    assert len(keys) == len(set(keys))
    assert len(after.functions[0].nodes) <= len(module.functions[0].nodes)
