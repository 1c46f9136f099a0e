"""The toy target's own promises: its schedule file round-trips, a damaged one is refused with
the file's name, and it declares its pipeline and legal ops."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings

from bitsmith.backends import backend_for_target
from bitsmith.backends.files import BytesFiles
from bitsmith.errors import ArtifactError
from bitsmith.ir import GraphBuilder, TensorType, evaluate
from bitsmith.testing import random_modules

from toy_backend import ToyBackend, schedule


@settings(max_examples=30, deadline=None)
@given(random_modules())
def test_schedule_round_trips_through_json(case):
    module, _ = case
    lowered = schedule.lower(module)
    assert schedule.from_json(schedule.to_json(lowered), "schedule.json") == lowered


def _tiny_module():
    b = GraphBuilder("main")
    b.param("x", TensorType(("batch", 3), "float32"))
    w = b.constant("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    y = b.op("linear", ["x", w])
    return b.module([b.op("relu", [y])])


def test_loaded_executable_runs_the_stored_schedule():
    module = _tiny_module()
    backend = backend_for_target("toy-numpy")
    files = backend.build(module, "toy-numpy", {}).files()
    doc = json.loads(files["schedule.json"])
    assert [s["op"] for s in doc["functions"][0]["steps"]] == ["constant", "linear", "relu"]
    # the loaded executable follows the file, not the module: drop the relu step, results change
    doc["functions"][0]["steps"].pop()
    doc["functions"][0]["results"] = [doc["functions"][0]["steps"][-1]["outputs"][0]]
    edited = backend.load(module, "toy-numpy", {}, BytesFiles({"schedule.json": json.dumps(doc).encode()}))
    x = np.array([[-1, -2, -3]], np.float32)
    assert np.array_equal(edited.run("main", [x])[0], x @ module.tensors["w"].T)
    assert np.array_equal(backend.load(module, "toy-numpy", {}, BytesFiles(files)).run("main", [x])[0],
                          evaluate(module, [x])[0])


@pytest.mark.parametrize("damage,message", [(lambda d: d.pop("format"), "not a toy-schedule"),
                                            (lambda d: d["functions"][0].pop("steps"), "malformed"),
                                            (lambda d: d["functions"].clear(), "functions"),
                                            (lambda d: d["functions"][0]["steps"][1].update(op="conv"),
                                             "op 'conv' has no toy kernel"),
                                            (lambda d: d["functions"][0]["steps"][1].update(dtypes=["float16"]),
                                             "needs one output of a dtype"),
                                            (lambda d: d["functions"][0]["steps"].reverse(), "before it is defined")])
def test_damaged_schedule_is_an_artifact_error(damage, message):
    module = _tiny_module()
    doc = json.loads(ToyBackend().build(module, "toy-numpy", {}).files()["schedule.json"])
    damage(doc)
    with pytest.raises(ArtifactError, match=message):
        ToyBackend().load(module, "toy-numpy", {}, BytesFiles({"schedule.json": json.dumps(doc).encode()}))


def test_declares_pipeline_and_legal_ops():
    backend = ToyBackend()
    assert backend.pipeline("toy-numpy", {}).finalize == ("dce",)
    legal = backend.legal_ops("toy-numpy", {})
    assert {"linear", "attention", "constant"} <= legal.ops and "qlinear" not in legal.ops
    module = _tiny_module()
    assert all(legal.check(n) is None for n in module.functions[0].nodes)
