"""DCE: drops nodes no result depends on and tensors no constant node refers to."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings

from bitsmith.ir import GraphBuilder, TensorType
from bitsmith.passes import DeadCodeElimination
from bitsmith.testing.strategies import random_modules
from pass_checks import assert_same_results, run_passes

DCE = DeadCodeElimination()


def test_removes_dead_nodes_and_unused_tensors():
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    live = b.op("relu", [x])
    w = b.constant("w", np.ones((2, 3), np.float32))
    b.op("mul", [b.op("neg", [x]), w])  # dead, and so is w
    b.constant("unused", np.zeros(4, np.float32))
    before = b.module([live])
    before = before.replace(tensors=before.tensors.with_tensors({"orphan": np.zeros(2, np.int8)}))

    after = run_passes(before, DCE)

    assert [n.op for n in after.functions[0].nodes] == ["relu"]
    assert after.functions[0].results == (live,)
    assert len(after.tensors) == 0
    assert len(before.functions[0].nodes) == 5 and set(before.tensors) == {"w", "unused", "orphan"}  # input untouched


def test_keeps_everything_results_depend_on():
    b = GraphBuilder()
    x = b.param("x", TensorType((2,), "float32"))
    w = b.constant("w", np.arange(2, dtype=np.float32))
    y = b.op("add", [x, w])
    z = b.op("neg", [y])
    before = b.module([y, z])
    assert run_passes(before, DCE) == before


@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_preserves_results_exactly_and_is_idempotent(case):
    module, args = case
    after = run_passes(module, DCE)  # verified by the PassManager
    assert_same_results(module, after, args)  # bitwise: DCE changes no arithmetic
    assert run_passes(after, DCE) == after
    fn = after.functions[0]
    used = {i for n in fn.nodes for i in n.inputs} | set(fn.results)
    assert all(any(o.name in used for o in n.outputs) for n in fn.nodes)
    assert set(after.tensors) == after.used_constants()
