"""The in-place KV cache (backends/tvm/kv_inplace.py): decode on capacity-sized caches written in
place gives the bits of the concat path (``main`` returning ``concat(past, new)``): same kernels
on the same values in the same order, so the oracle is exact equality, on tvm-llvm and lut-cpu,
native driver and Python executor, ragged batches included; within the backend's tolerance of the
reference interpreter; artifacts keep the variant, older ones decode on the concat path; and the
variant refuses what would make its in-place writes go astray."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.backends.tvm import kv_inplace
from bitsmith.backends.tvm.binder import ExecutionError
from bitsmith.backends.tvm.executor import aligned_empty
from bitsmith.errors import OptionError
from bitsmith.runtime.generate import empty_cache, main_args, round_capacity
from bitsmith.runtime.padding import mask_positions
from bitsmith.testing.hf_configs import make_model

from test_native_step import compile_case, stepper  # the same tiny models, compiled once per process

CASES = ("tvm-llvm", "lut-cpu")
IDS = np.array([[3, 17, 5, 9, 2, 11], [0, 0, 0, 8, 4, 21]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], np.int64)
STEPS = 7


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


@pytest.fixture(params=CASES)
def compiled(request):
    return compile_case(request.param)


def concat_logits(cm, ids, mask, steps):
    """Prefill + ``steps`` greedy steps on ``main`` (concatenated caches): every step's logits."""
    b = ids.shape[0]
    logits, *cache = cm.run("main", main_args(cm.module, ids, mask_positions(mask), empty_cache(cm.module, b), mask))
    out = [logits]
    for _ in range(steps):
        tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        logits, *cache = cm.run("main", main_args(cm.module, tok, mask_positions(mask)[:, -1:], cache, mask))
        out.append(logits)
    return out


def session_logits(cm, ids, mask, steps, capacity=None):
    """The same steps on the executable's KVSession."""
    b, s = ids.shape
    session = cm.executable.kv_session()
    session.start(b, capacity or round_capacity(s + steps + 1))
    logits = session.step(ids, mask_positions(mask), mask)
    out = [logits]
    for _ in range(steps):
        tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        logits = session.step(tok, mask_positions(mask)[:, -1:], mask)
        out.append(logits)
    return out


@pytest.mark.parametrize("python", [False, True], ids=["native", "python-executor"])
def test_inplace_logits_equal_concat_bit_for_bit(compiled, python):
    report = compiled.executable.report()
    assert report.get("kv_cache", report.get("host_kv_cache")) == "in place"
    stepper(compiled).python_steps = python
    try:
        want = concat_logits(compiled, IDS, MASK, STEPS)
        got = session_logits(compiled, IDS, MASK, STEPS)
    finally:
        stepper(compiled).python_steps = False
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and np.array_equal(g, w)


def test_capacity_does_not_change_the_bits(compiled):
    """Slots beyond the live length are never read: a larger capacity gives the same logits."""
    small = session_logits(compiled, IDS[:1], MASK[:1], 3, capacity=10)
    large = session_logits(compiled, IDS[:1], MASK[:1], 3, capacity=256)
    assert all(np.array_equal(a, b) for a, b in zip(small, large))


def test_generate_uses_the_session_and_equals_concat(compiled):
    assert compiled.kv_inplace
    inplace = np.asarray(compiled.generate(IDS, 9, attention_mask=MASK))
    compiled.kv_inplace = False
    try:
        concat = np.asarray(compiled.generate(IDS, 9, attention_mask=MASK))
    finally:
        compiled.kv_inplace = True
    assert np.array_equal(inplace, concat)


@pytest.mark.parametrize("name", ["tvm-llvm", pytest.param("lut-cpu", marks=pytest.mark.slow)])
def test_inplace_logits_within_tolerance_of_the_reference(name):
    compiled = compile_case(name)
    ref = bitsmith.compile(make_model("llama"), target="reference",
                           **{k: v for k, v in compiled.options.items() if k in ("quant", "group_size")})
    tol = backend_for_target(compiled.target).tolerance(compiled.target, compiled.options)
    got = session_logits(compiled, IDS, MASK, 3)
    # the reference decodes the same tokens (ids chosen from the target's logits) on its own caches
    b = IDS.shape[0]
    mask, ids = MASK, IDS
    logits, *cache = ref.run("main", main_args(ref.module, ids, mask_positions(mask), empty_cache(ref.module, b), mask))
    for k, g in enumerate(got):
        live = mask.astype(bool)[:, -g.shape[1]:]
        assert tol.mismatch(g[live], logits[live]) is None, (k, tol.mismatch(g[live], logits[live]))
        tok = g[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        logits, *cache = ref.run("main", main_args(ref.module, tok, mask_positions(mask)[:, -1:], cache, mask))


def test_artifact_keeps_the_variant_and_older_artifacts_decode_on_concat(tmp_path):
    cm = compile_case("tvm-llvm")
    cm.save(str(tmp_path / "new"))
    (plan_file,) = tmp_path.joinpath("new").rglob("plan.json")
    assert len(json.loads(plan_file.read_text())[kv_inplace.PLAN_FIELD]) == 1
    loaded = bitsmith.load(str(tmp_path / "new"))
    assert loaded.executable.kv_session() is not None
    want = np.asarray(cm.generate(IDS, 5, attention_mask=MASK))
    assert np.array_equal(np.asarray(loaded.generate(IDS, 5, attention_mask=MASK)), want)
    host = cm.executable.host
    variants, host.variants = host.variants, {}  # what an artifact from before the variant holds
    try:
        cm.save(str(tmp_path / "old"))
    finally:
        host.variants = variants
    old = bitsmith.load(str(tmp_path / "old"))
    assert old.executable.kv_session() is None and old.report()["executable"]["kv_cache"].startswith("concat")
    assert np.array_equal(np.asarray(old.generate(IDS, 5, attention_mask=MASK)), want)
    (old_plan,) = tmp_path.joinpath("old").rglob("plan.json")
    assert kv_inplace.PLAN_FIELD not in json.loads(old_plan.read_text())


def test_variant_refuses_arguments_its_writes_would_miss_or_overrun():
    cm = compile_case("tvm-llvm")
    session = cm.executable.kv_session()
    session.start(1, 8)
    ids = np.array([[1, 2, 3]], np.int64)
    pos = np.arange(3)[None]
    with pytest.raises(ExecutionError, match="live length 9"):
        session.step(ids, pos, np.ones((1, 9), np.int64))  # beyond the capacity
    with pytest.raises(ExecutionError, match="live length 2"):
        session.step(ids, pos, np.ones((1, 2), np.int64))  # shorter than the step's own tokens
    caches = [c.copy(order="F") if k == 0 else c for k, c in enumerate(session.caches)]
    ex = cm.executable.executors[kv_inplace.KEY]
    with pytest.raises(ExecutionError, match="C-contiguous"):  # a copy would take the write
        ex.run([ids, pos, *caches, np.ones((1, 3), np.int64)])
    frozen = [aligned_empty(c.shape, c.dtype) for c in session.caches]
    frozen[0].flags.writeable = False
    with pytest.raises(ExecutionError, match="writable"):
        ex.run([ids, pos, *frozen, np.ones((1, 3), np.int64)])


def test_plan_without_attention_mask_has_no_variant():
    """A module compiled without the mask (kv-cache pass option) has nothing to take the live
    length from: no variant, concat decode as before."""
    from bitsmith.backends.tvm.llvm_target import _inplace_variant
    from bitsmith.backends.tvm.lowering import lower_function
    cm = compile_case("tvm-llvm")
    fn = cm.module.function("main")
    no_mask = fn.replace(params=fn.params[:-1])
    plan, kdefs, _ = lower_function(cm.module, fn, "tvm-llvm")
    assert _inplace_variant(cm.module, no_mask, plan, dict(kdefs)) is None
    variant = _inplace_variant(cm.module, fn, plan, dict(kdefs))
    names = [s.name for s in variant.steps if hasattr(s, "kernel")]
    caches = sum(1 for p in fn.params if p.name.startswith("past_"))
    assert sum(n.startswith("kv_write") for n in names) == caches
    assert sum(n.endswith("_kvcap") for n in names) == caches // 2
    assert len(variant.results) == 1  # logits only: the caches stay in the session


def test_float16_cache_option(tmp_path):
    """tvm-llvm ``kv_dtype="float16"``: the session's caches are float16 (half the bytes attention
    reads), keys and values rounded to nearest when written. Oracle: the float32 in-place path of
    the same model fed the same tokens; each key and value moves by at most 2^-11 (4.9e-4) of
    itself: measured 7.1e-5 of max|logit| here, bound 1e-3 (about two such roundings)."""
    model = make_model("llama")
    f32 = compile_case("tvm-llvm")
    f16 = bitsmith.compile(model, target="tvm-llvm", kv_dtype="float16")
    assert f16.report()["executable"]["kv_dtype"] == "float16"
    sessions = [cm.executable.kv_session() for cm in (f16, f32)]
    for sn in sessions:
        sn.start(2, 16)
    assert {c.dtype for c in sessions[0].caches} == {np.dtype("float16")}
    mask, pos = MASK, mask_positions(MASK)
    got, want = (sn.step(IDS, pos, mask) for sn in sessions)
    rows = MASK[:, -1] == 1
    for _ in range(STEPS):
        assert np.abs(got[:, -1] - want[:, -1])[rows].max() <= 1e-3 * float(np.abs(want[:, -1]).max())
        tok = want[:, -1].argmax(-1)[:, None].astype(np.int64)  # both runs take the float32 run's tokens
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        got, want = (sn.step(tok, mask_positions(mask)[:, -1:], mask) for sn in sessions)
    # the concat path keeps the model's type (float32 past and present)
    assert np.array_equal(concat_logits(f16, IDS, MASK, 1)[1], concat_logits(f32, IDS, MASK, 1)[1])
    f16.save(tmp_path / "a")
    reloaded = bitsmith.load(tmp_path / "a")
    assert reloaded.report()["executable"]["kv_dtype"] == "float16"  # read back from the variant
    loaded = reloaded.executable.kv_session()
    loaded.start(1, 8)
    assert loaded.caches[0].dtype == np.float16


def test_lut_cpu_passes_kv_dtype_to_its_host(tmp_path):
    """lut-cpu's tvm-llvm host takes ``kv_dtype`` too: float16 caches, logits within the float16
    rounding bound of the float32 test above of lut-cpu's own float32-cache run (fp32 tables:
    int8 tables would re-round the perturbed activations, a step of 1/254 of a block's largest;
    measured 5.9e-5 of max|logit| on Zen 5, bound 1e-3); refused with the reference host (no
    in-place cache there)."""
    from test_native_step import CASES as BUILDS
    target, options = BUILDS["lut-cpu"]
    options = {**options, "lut_tables": "fp32"}
    f32 = bitsmith.compile(make_model("llama"), target=target, **options)
    f16 = bitsmith.compile(make_model("llama"), target=target, **options, kv_dtype="float16")
    assert f16.report()["executable"]["host_kv_dtype"] == "float16"
    sessions = [cm.executable.kv_session() for cm in (f16, f32)]
    for sn in sessions:
        sn.start(2, 16)
    assert {c.dtype for c in sessions[0].caches} == {np.dtype("float16")}
    got, want = (sn.step(IDS, mask_positions(MASK), MASK) for sn in sessions)
    rows = MASK[:, -1] == 1
    assert np.abs(got[:, -1] - want[:, -1])[rows].max() <= 1e-3 * float(np.abs(want[:, -1]).max())
    with pytest.raises(OptionError, match="lut_host='reference' has none"):
        bitsmith.compile(make_model("llama"), target=target, **options, kv_dtype="float16", lut_host="reference")
    with pytest.raises(OptionError, match="kv_dtype must be one of"):
        bitsmith.compile(make_model("llama"), target=target, **options, kv_dtype="int8")


def test_bad_kv_dtype_is_refused():
    with pytest.raises(OptionError, match="kv_dtype must be one of"):
        bitsmith.compile(make_model("llama"), target="tvm-llvm", kv_dtype="bfloat16")
