"""The native step driver (backends/tvm/native_step.py): one C call per run of a plan gives the
same bytes as the kernels called one by one from Python (the same kernels on the same inputs
in the same order: the oracle is exact equality), on tvm-llvm and on lut-cpu's tvm-llvm host;
it ships in the artifact as trusted native code with its instruction set recorded, and a
build without it falls back to the Python executor."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitsmith
from bitsmith.backends.tvm import native_step
from bitsmith.runtime.batching import DecodeBatch
from bitsmith.runtime.generate import empty_cache, main_args, positions
from bitsmith.testing.hf_configs import VOCAB, make_model

QUANT = {"quant": "rtn-int4", "group_size": 32}
CASES = {"tvm-llvm": ("tvm-llvm", {}), "tvm-llvm-rtn-int4": ("tvm-llvm", QUANT), "lut-cpu": ("lut-cpu", QUANT),
         "lut-cpu-a8": ("lut-cpu", {**QUANT, "activation_bits": 8})}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


def stepper(cm):
    """What ``python_steps`` switches: the executable, or lut-cpu's tvm-llvm host."""
    host = getattr(cm.executable, "host", None)
    return host if hasattr(host, "python_steps") else cm.executable


def executors(cm):
    return stepper(cm).executors


_COMPILED: dict[str, object] = {}


def compile_case(name: str):
    """One compile per case for the whole module (tiny models, shared kernel cache)."""
    if name not in _COMPILED:
        target, options = CASES[name]
        _COMPILED[name] = bitsmith.compile(make_model("llama"), target=target, **options)
    return _COMPILED[name]


@pytest.fixture(params=["tvm-llvm", pytest.param("tvm-llvm-rtn-int4", marks=pytest.mark.slow), "lut-cpu", "lut-cpu-a8"])
def compiled(request):
    return compile_case(request.param)


@pytest.fixture(params=["tvm-llvm", "lut-cpu"])
def compiled_target(request):
    return compile_case(request.param)


def _decode_run(cm, python: bool, ids: np.ndarray, mask: np.ndarray | None, steps: int) -> list[np.ndarray]:
    """Prefill (left-padded rows when ``mask``), then ``steps`` greedy steps; every output array."""
    stepper(cm).python_steps = python
    try:
        b, s = ids.shape
        pos = positions(b, 0, s) if mask is None else np.maximum(np.cumsum(mask, 1) - 1, 0)
        out = cm.run("main", main_args(cm.module, ids, pos, empty_cache(cm.module, b), mask))
        arrays = list(out)
        logits, *cache = out
        for i in range(steps):
            tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            if mask is not None:
                mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
                pos = mask.sum(1, keepdims=True) - 1
            else:
                pos = positions(b, s + i, 1)
            out = cm.run("main", main_args(cm.module, tok, pos, cache, mask))
            arrays += list(out)
            logits, *cache = out
        return arrays
    finally:
        stepper(cm).python_steps = False


def test_native_driver_runs_and_equals_python_bit_for_bit(compiled):
    # the in-place KV variant's executor wraps a native one (kv_inplace.KVInplaceExecutor)
    assert all(isinstance(getattr(e, "inner", e), native_step.NativePlanExecutor) for e in executors(compiled).values())
    rng = np.random.default_rng(3)
    ids = rng.integers(0, VOCAB, (2, 6)).astype(np.int64)
    mask = np.ones((2, 6), np.int64)
    mask[1, :2] = 0  # a left-padded (ragged) row
    for m in (None, mask):
        want = _decode_run(compiled, True, ids, m, 6)
        got = _decode_run(compiled, False, ids, m, 6)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes()


def test_greedy_generate_and_decode_batch_equal_python(compiled_target):
    compiled = compiled_target
    ids = np.random.default_rng(4).integers(0, VOCAB, (1, 5)).astype(np.int64)
    outs = {}
    for python in (True, False):
        stepper(compiled).python_steps = python
        batch = DecodeBatch(compiled)
        first = {"a": batch.admit("a", ids[0]), "b": batch.admit("b", ids[0, :3])}
        steps = [batch.step({k: int(v.argmax()) for k, v in first.items()})]
        outs[python] = (compiled.generate(ids, max_new_tokens=8).numpy(), first, steps)
    stepper(compiled).python_steps = False
    np.testing.assert_array_equal(outs[False][0], outs[True][0])
    for k in ("a", "b"):
        assert outs[False][1][k].tobytes() == outs[True][1][k].tobytes()
        assert outs[False][2][0][k].tobytes() == outs[True][2][0][k].tobytes()


def test_bad_token_id_raises_the_python_executors_error():
    compiled = compile_case("tvm-llvm")
    from bitsmith.backends.tvm.binder import ExecutionError
    ids = np.array([[1, VOCAB + 3]], np.int64)
    with pytest.raises(ExecutionError, match="token id out of range"):
        compiled.run("main", main_args(compiled.module, ids, positions(1, 0, 2), empty_cache(compiled.module, 1)))


def test_artifact_ships_the_driver_as_trusted_native_code(compiled_target, tmp_path):
    compiled = compiled_target
    compiled.save(str(tmp_path / "a"))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert native_step.DRIVER_FILE in text  # declared among the native files the trust check covers
    plans = list((tmp_path / "a").rglob("plan.json"))
    assert len(plans) == 1
    plan = json.loads(plans[0].read_text())
    assert plan["driver_isa"] == native_step.SPEC.to_json()
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert all(isinstance(getattr(e, "inner", e), native_step.NativePlanExecutor) for e in executors(loaded).values())
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    want = _decode_run(compiled, True, ids, None, 3)
    got = _decode_run(loaded, False, ids, None, 3)
    assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want))


def test_a8_layers_run_a8_tables_in_the_driver_or_fall_back_to_python():
    from bitsmith.backends.lut import native
    from bitsmith.backends.lut.native_step import native_extern
    cm = compile_case("lut-cpu-a8")
    ex = executors(cm)["main"]
    assert set(ex.externs["kind"].tolist()) == {native.TABLES_A8}
    # an engine from before W4A8 (no lut_exec_tables): no driver entry, the Python path runs
    fast = cm.executable.fast
    old = type("OldEngine", (), {"has_a8": False, "plan": staticmethod(fast.plan)})()
    entry = next(iter(cm.executable.layers.values()))
    assert native_extern(fast, entry, True, 1, None, print, activation_bits=8) is not None
    assert native_extern(old, entry, True, 1, None, print, activation_bits=8) is None


def _python_plan_parts(ex):
    """The kernels and constants of a NativePlanExecutor's plan, to build a variant of it."""
    from bitsmith.backends.tvm.plan import Call
    py = ex.python
    kernels = {s.kernel: step[1] for s, step in zip(ex.plan.steps, py._steps) if isinstance(s, Call)}
    return kernels, {slot: a for slot, a in enumerate(py.base_env) if a is not None}


def test_a_view_larger_than_its_source_is_refused_before_the_driver_runs():
    from dataclasses import replace
    from types import SimpleNamespace
    from bitsmith.backends.tvm.executor import PlanExecutor
    from bitsmith.backends.tvm.plan import View
    from bitsmith.errors import ArtifactError
    cm = compile_case("tvm-llvm")
    ex = executors(cm)["main"]
    plan = ex.plan
    i = next(k for k, s in enumerate(plan.steps) if isinstance(s, View))
    v = plan.steps[i]
    # the same view with one more dim of 2: twice its source's elements (a crafted plan.json)
    bad = replace(plan, shapes=list(plan.shapes) + [list(plan.shapes[v.shape]) + [2]],
                  steps=plan.steps[:i] + [View(v.src, v.dst, len(plan.shapes))] + plan.steps[i + 1:])
    kernels, consts = _python_plan_parts(ex)
    calls = []
    driver = SimpleNamespace(run=lambda *a: calls.append(a) or 0, api_ptr=ex.driver.api_ptr)
    native = native_step.NativePlanExecutor(PlanExecutor(bad, kernels, consts), kernels, driver)
    args = main_args(cm.module, np.array([[1, 2, 3]], np.int64), positions(1, 0, 3), empty_cache(cm.module, 1))
    with pytest.raises(ArtifactError, match="a view of .* elements"):
        native.run(args)
    assert not calls  # refused before any kernel could read or write past a buffer
    with pytest.raises(ArtifactError):  # the Python executor refuses the same plan
        PlanExecutor(bad, kernels, consts).run(args)


def _dl(arr):
    rec = np.zeros(1, native_step.DLTENSOR)
    code, bits = native_step._dl_dtype(arr.dtype)
    shape = np.array(arr.shape, np.int64)
    rec["data"], rec["device_type"], rec["ndim"], rec["code"], rec["bits"], rec["lanes"] = \
        arr.ctypes.data, native_step.KDL_CPU, arr.ndim, code, bits, 1
    rec["shape"] = shape.ctypes.data
    return rec, shape


def test_extern_step_refuses_operands_that_are_not_float32_or_a_short_bias():
    cm = compile_case("lut-cpu")
    ex = executors(cm)["main"]
    rec = ex.externs[:1].copy()
    n, k = int(rec["n"][0]), int(rec["k"][0])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, k)).astype(np.float32)
    bias = rng.normal(size=n + 1).astype(np.float32)  # sliced below: no byte is read out of bounds

    def run(x, b, y):
        table, keep = zip(*(_dl(a) for a in (x, b, y)))
        table = np.concatenate(table)
        prog = np.array([native_step.OP_EXTERN, 0, 1, 0, 1, 2], np.int64)
        return int(ex.driver.run(prog.ctypes.data, prog.size, table.ctypes.data, 3, ex.handles_ptr,
                                 len(ex.handles), rec.ctypes.data, 1, ex.driver.api_ptr))

    y = np.zeros((2, n), np.float32)
    assert run(x, bias[:n], y) == 0
    bound = next(o[0] for o in ex._owners if isinstance(o, tuple))  # extern 0's engine binding
    want = bound(x, int(rec["kind"][0]), 1, None)
    want += bias[:n]
    assert y.tobytes() == want.tobytes()
    for bad in [(x.astype(np.float64), bias[:n], y), (x, bias[:n].astype(np.float64), y),
                (x, bias[:n - 1], y), (x, bias[:n].reshape(1, n), y), (x, bias[:n], y.astype(np.float64))]:
        assert run(*bad) & 0xFF == native_step.ERR_ARGS


def test_driver_out_of_memory_returns_the_python_result_other_codes_raise():
    from types import SimpleNamespace
    from bitsmith.errors import ArtifactError
    cm = compile_case("tvm-llvm")
    ex = executors(cm)["main"]
    args = main_args(cm.module, np.array([[1, 2, 3]], np.int64), positions(1, 0, 3), empty_cache(cm.module, 1))
    want = ex.python.run(args)
    real = ex.driver
    try:
        ex.driver = SimpleNamespace(run=lambda *a: (4 << 8) | native_step.ERR_MEMORY, api_ptr=real.api_ptr)
        got = ex.run(args)
        assert len(got) == len(want) and all(g.tobytes() == w.tobytes() for g, w in zip(got, want))
        ex.driver = SimpleNamespace(run=lambda *a: (4 << 8) | native_step.ERR_KERNEL, api_ptr=real.api_ptr)
        with pytest.raises(ArtifactError, match="step driver stopped at step 4"):
            ex.run(args)
    finally:
        ex.driver = real


def test_untrusted_artifact_driver_is_refused(tmp_path, monkeypatch):
    from bitsmith.backends import native_loader
    compile_case("tvm-llvm").save(str(tmp_path / "a"))
    monkeypatch.setenv("BITSMITH_TRUST_STORE", str(tmp_path / "empty-store"))
    native_loader.reset_grants()
    with pytest.raises(Exception, match="stepdrv.so"):
        bitsmith.load(str(tmp_path / "a"))


def test_without_a_c_compiler_the_python_executor_runs(monkeypatch, tmp_path):
    from bitsmith.backends.tvm.executor import PlanExecutor
    monkeypatch.setattr(native_step, "build_driver", lambda: None)
    cm = bitsmith.compile(make_model("llama"), target="tvm-llvm")
    assert all(type(getattr(e, "inner", e)) is PlanExecutor for e in cm.executable.executors.values())
    assert "from Python" in cm.report()["executable"]["executor"]
    cm.save(str(tmp_path / "a"))
    assert not list((tmp_path / "a").rglob("stepdrv.so"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert all(type(getattr(e, "inner", e)) is PlanExecutor for e in loaded.executable.executors.values())


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tvm-llvm", "lut-cpu"])
def test_smollm2_greedy_tokens_and_logits_equal_python(smollm2, target):
    model, tok = smollm2
    cm = bitsmith.compile(model, target=target, quant="rtn-int4")
    enc = tok.encode("The capital of France is")
    ids = np.array([getattr(enc, "ids", enc)], dtype=np.int64)
    want = _decode_run(cm, True, ids, None, 12)
    got = _decode_run(cm, False, ids, None, 12)
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()
