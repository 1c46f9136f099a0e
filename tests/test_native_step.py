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
CASES = {"tvm-llvm": ("tvm-llvm", {}), "tvm-llvm-rtn-int4": ("tvm-llvm", QUANT), "lut-cpu": ("lut-cpu", QUANT)}


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


@pytest.fixture(params=["tvm-llvm", pytest.param("tvm-llvm-rtn-int4", marks=pytest.mark.slow), "lut-cpu"])
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
    assert all(isinstance(e, native_step.NativePlanExecutor) for e in executors(compiled).values())
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
    assert all(isinstance(e, native_step.NativePlanExecutor) for e in executors(loaded).values())
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    want = _decode_run(compiled, True, ids, None, 3)
    got = _decode_run(loaded, False, ids, None, 3)
    assert all(g.tobytes() == w.tobytes() for g, w in zip(got, want))


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
    assert all(type(e) is PlanExecutor for e in cm.executable.executors.values())
    assert "from Python" in cm.report()["executable"]["executor"]
    cm.save(str(tmp_path / "a"))
    assert not list((tmp_path / "a").rglob("stepdrv.so"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert all(type(e) is PlanExecutor for e in loaded.executable.executors.values())


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
