"""Prefill computing the last position's logits only (backends/tvm/last_logits.py): the variant's
logits are the full variant's last position to float rounding (the lm_head's M = 1 path sums in
another order) and within the backend's tolerance of the reference interpreter, ragged
(left-padded) batches included; generation uses it; artifacts keep it and older ones (without
it) slice the full logits; a plan whose logits it cannot cut is left alone."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.backends.tvm import kv_inplace, last_logits
from bitsmith.backends.tvm.plan import Call, FunctionPlan, View
from bitsmith.runtime.generate import empty_cache, main_args
from bitsmith.runtime.padding import mask_positions
from bitsmith.testing.hf_configs import make_model

from test_native_step import compile_case

CASES = ("tvm-llvm", "lut-cpu")
IDS = np.array([[3, 17, 5, 9, 2, 11], [0, 0, 0, 8, 4, 21]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], np.int64)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


def prefill_logits(cm) -> str:
    report = cm.report()["executable"]
    return report.get("prefill_logits", report.get("host_prefill_logits"))  # tvm-llvm / lut-cpu's host


def prefill(cm, last_only: bool, ids=IDS, mask=MASK) -> np.ndarray:
    session = cm.executable.kv_session()
    session.start(ids.shape[0], 16)
    return session.step(ids, mask_positions(mask), mask, last_only=last_only)


@pytest.mark.parametrize("case", CASES)
def test_last_position_logits_match_the_full_variant_and_the_reference(case):
    cm = compile_case(case)
    assert prefill_logits(cm) == "last position"
    full, last = prefill(cm, False), prefill(cm, True)
    assert last.shape == (IDS.shape[0], 1, full.shape[2])
    # the same lm_head kernel on the same rows, summed in another order: float32's tolerance (for
    # lut-cpu too: its int8 tables quantize the same activations the same way either way)
    f32 = backend_for_target("tvm-llvm").tolerance("tvm-llvm", {})
    assert f32.mismatch(last, full[:, -1:]) is None, f32.mismatch(last, full[:, -1:])
    assert (last.argmax(-1) == full[:, -1:].argmax(-1)).all()
    tol = backend_for_target(cm.target).tolerance(cm.target, cm.options)
    ref = bitsmith.compile(make_model("llama"), target="reference",
                           **{k: v for k, v in cm.options.items() if k in ("quant", "group_size")})
    want, *_ = ref.run("main", main_args(ref.module, IDS, mask_positions(MASK), empty_cache(ref.module, 2), MASK))
    assert tol.mismatch(last, want[:, -1:]) is None, tol.mismatch(last, want[:, -1:])


@pytest.mark.parametrize("case", CASES)
def test_generation_prefills_through_the_variant_and_decode_steps_through_the_full_one(case, monkeypatch):
    cm = compile_case(case)
    runs: list[tuple[bool, int]] = []  # (the last-logits variant?, tokens) per run of a variant
    run = kv_inplace.KVInplaceExecutor.run

    def spy(self, args):
        runs.append((any(getattr(s, "name", "").startswith("take_last") for s in self.plan.steps), args[0].shape[1]))
        return run(self, args)

    monkeypatch.setattr(kv_inplace.KVInplaceExecutor, "run", spy)
    out = cm.generate(IDS, 3, attention_mask=MASK)
    assert runs == [(True, IDS.shape[1]), (False, 1), (False, 1)]
    assert np.asarray(out).shape == (2, IDS.shape[1] + 3)


def test_artifact_keeps_the_variant_and_older_artifacts_slice_the_full_logits(tmp_path):
    cm = compile_case("tvm-llvm")
    cm.save(str(tmp_path / "new"))
    (plan_file,) = tmp_path.joinpath("new").rglob("plan.json")
    assert len(json.loads(plan_file.read_text())[last_logits.PLAN_FIELD]) == 1
    loaded = bitsmith.load(str(tmp_path / "new"))
    assert prefill_logits(loaded) == "last position"
    assert np.array_equal(prefill(loaded, True), prefill(cm, True))  # the same kernels: the same bits
    host = cm.executable.host
    variants = host.variants
    host.variants = {kv_inplace.KEY: variants[kv_inplace.KEY]}  # an artifact from before the variant
    try:
        cm.save(str(tmp_path / "old"))
    finally:
        host.variants = variants
    old = bitsmith.load(str(tmp_path / "old"))
    assert prefill_logits(old) == "every position"
    assert np.array_equal(prefill(old, True), prefill(cm, False)[:, -1:])
    assert np.array_equal(np.asarray(old.generate(IDS, 4, attention_mask=MASK)),
                          np.asarray(cm.generate(IDS, 4, attention_mask=MASK)))


def test_a_step_without_tokens_is_refused():
    from bitsmith.backends.tvm.binder import ExecutionError
    cm = compile_case("tvm-llvm")
    session = cm.executable.kv_session()
    session.start(1, 8)
    ex = cm.executable.executors[last_logits.KEY]
    with pytest.raises(ExecutionError, match="at least one token"):  # take_last would read row -1
        ex.run([np.zeros((1, 0), np.int64), np.zeros((1, 0), np.int64), *session.caches, np.ones((1, 2), np.int64)])


def _plan(results, steps, shapes, consts=()) -> FunctionPlan:
    from bitsmith.backends.tvm.plan import Const
    return FunctionPlan("main", 8, [0], [(["batch", "seq", 4], "float32")], results, shapes,
                        [Const(c, tensor="w") for c in consts], steps)


LINEAR = {"k": SimpleNamespace(kind="gemv"), "mm": SimpleNamespace(kind="qgemv"), "n": SimpleNamespace(kind="fused"),
          "cap": SimpleNamespace(kind="injective")}  # kernel key -> what derive_plan reads of a KernelDef


@pytest.mark.parametrize("plan, words", [
    (_plan([2, 3], [Call("k", [0, 1], [(2, 0, "float32")]), Call("k", [0, 1], [(3, 0, "float32")])],
           [["batch", "seq", 8]], [1]), "2 results"),
    (_plan([1], [Call("k", [0, 1], [(2, 0, "float32")])], [["batch", "seq", 8]], [1]), "not computed by a kernel"),
    (_plan([3], [Call("k", [0], [(2, 0, "float32")]), Call("k", [0], [(6, 0, "float32")]),
                 Call("k", [2, 6], [(3, 0, "float32")])], [["batch", "seq", 8]]), "one activation input"),
    (_plan([3], [Call("k", [0], [(2, 0, "float32")]), View(2, 4, 1), Call("k", [4, 1], [(3, 2, "float32")])],
           [["batch", 4, "seq"], ["batch*seq", 4], ["batch*seq", 8]], [1]), "not [batch, seq, d]"),
    (_plan([3], [Call("k", [0], [(2, 0, "float32")]), View(2, 4, 1), Call("k", [4, 1], [(3, 2, "float32")]),
                 Call("k", [4], [(5, 1, "float32")])],
           [["batch", "seq", 4], ["batch*seq", 4], ["batch*seq", 8]], [1]), "other readers"),
    # a soft-cap after the lm_head: the logits' kernel is elementwise, not a projection
    (_plan([6], [Call("n", [0], [(2, 0, "float32")]), View(2, 3, 1), Call("mm", [3, 1], [(4, 2, "float32")]),
                 View(4, 5, 3), Call("cap", [5], [(6, 3, "float32")])],
           [["batch", "seq", 4], ["batch*seq", 4], ["batch*seq", 8], ["batch", "seq", 8]], [1]), "not a linear kernel"),
])
def test_plans_whose_logits_it_cannot_cut_are_refused(plan, words):
    with pytest.raises(last_logits.LastLogitsUnavailable, match=re.escape(words)):
        last_logits.derive_plan(plan, dict(LINEAR))


def test_derived_plan_takes_the_last_row_before_the_projection():
    plan = _plan([5], [Call("n", [0], [(2, 0, "float32")]), View(2, 3, 1), Call("mm", [3, 1], [(4, 2, "float32")]),
                       View(4, 5, 3)],
                 [["batch", "seq", 4], ["batch*seq", 4], ["batch*seq", 8], ["batch", "seq", 8]], [1])
    kernels: dict = dict(LINEAR)
    out = last_logits.derive_plan(plan, kernels)
    (kdef,) = [v for k, v in kernels.items() if k not in LINEAR]
    take = out.steps[1]
    assert isinstance(take, Call) and take.kernel == kdef.digest() and take.inputs == [2]
    assert out.shapes[take.outputs[0][1]] == ["batch", 1, 4]
    view, mm, back = out.steps[2:]
    assert view.src == take.outputs[0][0] and out.shapes[view.shape] == ["batch", 4]
    assert out.shapes[mm.outputs[0][1]] == ["batch", 8] and out.shapes[back.shape] == ["batch", 1, 8]
    assert plan.steps[1].src == 2 and plan.shapes == [["batch", "seq", 4], ["batch*seq", 4], ["batch*seq", 8],
                                                      ["batch", "seq", 8]]  # the input plan is untouched


def test_take_last_kernel_copies_row_seq_minus_one():
    import tvm
    from bitsmith.backends.tvm.executor import aligned_empty
    f = tvm.tirx.build(last_logits.take_last_kernel("float32").func, target="llvm") \
        if hasattr(tvm, "tirx") else tvm.build(last_logits.take_last_kernel("float32").func, target="llvm")
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    out = aligned_empty((3, 1, 7), np.dtype(np.float32))
    f(x, out)
    assert np.array_equal(out, x[:, -1:])
