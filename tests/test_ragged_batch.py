"""Ragged batches (issue 14, part 2): the attention key mask, left-padded generate, DecodeBatch.

Oracles: a scalar numpy attention written here (masked softmax, one query row at a time), and
each prompt run alone in a batch of one. Batch invariance is asserted bit-exact on the
decode path (DecodeBatch) on every CPU target, because the kernels' reductions run in an
order that does not depend on the batch (docs/ragged-batches.md says where and why); the
left-padded prefill of generate is asserted within each target's Tolerance, and its greedy
tokens equal.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.ir import run_function
from bitsmith.ir.builder import GraphBuilder
from bitsmith.ir.types import IRTypeError, TensorType
from bitsmith.runtime.batching import DecodeBatch
from bitsmith.runtime.generate import RaggedBatchError, has_attention_mask
from bitsmith.runtime.padding import left_pad
from bitsmith.testing.hf_configs import VOCAB, make_model

TARGETS = {"reference": {}, "tvm-llvm": {}, "lut-cpu": {"quant": "rtn-int4", "group_size": 32}}
LENGTHS = (5, 11, 2, 8)


def oracle_attention(q, k, v, scale, causal, mask):
    """One query row at a time, in float64: visible keys j (causal: j <= i + t - s; mask[b, j]
    nonzero), softmax over them, zeros when none is visible."""
    b, hq, s, _ = q.shape
    hk, t = k.shape[1], k.shape[2]
    out = np.zeros((b, hq, s, v.shape[3]))
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(s):
                seen = [j for j in range(t) if (not causal or j <= i + t - s) and mask[bi, j]]
                if not seen:
                    continue
                sc = np.array([float(np.dot(q[bi, h, i].astype(np.float64), k[bi, kh, j])) * scale for j in seen])
                p = np.exp(sc - sc.max())
                out[bi, h, i] = (p / p.sum()) @ v[bi, kh, seen].astype(np.float64)
    return out


def masked_attention_module(heads: int, kv_heads: int, d: int, mask_dtype: str, causal: bool):
    g = GraphBuilder()
    q = g.param("q", TensorType(("batch", heads, "seq", d), "float32"))
    k = g.param("k", TensorType(("batch", kv_heads, "kv", d), "float32"))
    v = g.param("v", TensorType(("batch", kv_heads, "kv", d), "float32"))
    m = g.param("mask", TensorType(("batch", "kv"), mask_dtype))
    return g.module([g.op("attention", (q, k, v, m), {"scale": d ** -0.5, "causal": causal})])


_BUILT: dict = {}


def _executable(target: str, key: tuple):
    """One build per (target, heads, kv heads, dim, mask dtype, causal): the dims stay symbolic."""
    if (target, key) not in _BUILT:
        module = masked_attention_module(*key)
        backend = backend_for_target(target)
        options = backend.option_defaults(target)
        _BUILT[(target, key)] = backend.build(module, target, options)
    return _BUILT[(target, key)]


# float32 kernels against a float64 oracle on O(1) data: a few ulps of the O(1) outputs;
# 1e-5 is the tvm-llvm single-op bound of tests/test_tvm_llvm.py
# tvm-llvm builds one kernel per head layout, dtype and causality (the dims stay symbolic), so
# its head layout is fixed at grouped-query 4/2 (the harder indexing) to keep the builds few;
# the reference draws the layouts too
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(["reference", "tvm-llvm"]), b=st.integers(1, 3), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), d=st.sampled_from([4, 8]), seq=st.integers(1, 4), extra=st.integers(0, 6),
       mask_dtype=st.sampled_from(["int64", "bool"]), causal=st.booleans(), data=st.data())
def test_masked_attention_matches_scalar_oracle(tmp_path_factory, monkeypatch, target, b, kv_heads, group, d, seq,
                                                extra, mask_dtype, causal, data):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ragged-cache"))
    if target != "reference":
        kv_heads, group, d = 2, 2, 8
    t = seq + extra
    seed = data.draw(st.integers(0, 2 ** 16))
    rng = np.random.default_rng(seed)
    bits = data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    mask = np.array(bits, dtype=bool).reshape(b, t)
    q = rng.standard_normal((b, kv_heads * group, seq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv_heads, t, d)).astype(np.float32) for _ in range(2))
    want = oracle_attention(q, k, v, d ** -0.5, causal, mask)
    args = [q, k, v, mask.astype(mask_dtype)]
    (got,) = _executable(target, (kv_heads * group, kv_heads, d, mask_dtype, causal)).run("main", args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_of_the_wrong_shape_or_dtype_is_refused_by_the_verifier():
    for shape, dtype, message in ((("batch", "seq"), "int64", r"key mask must be \[batch, kv_len\]"),
                                  (("batch", "kv", 1), "int64", r"key mask must be \[batch, kv_len\]"),
                                  (("batch", "kv"), "float32", "must be bool or integer")):
        g = GraphBuilder()
        q = g.param("q", TensorType(("batch", 2, "seq", 4), "float32"))
        k = g.param("k", TensorType(("batch", 2, "kv", 4), "float32"))
        m = g.param("mask", TensorType(shape, dtype))
        with pytest.raises(IRTypeError, match=message):
            g.op("attention", (q, k, k, m), {"scale": 0.5, "causal": True})


# ---------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ragged-cache"))
    models = {t: bitsmith.compile(make_model("llama"), target=t, **opts) for t, opts in TARGETS.items()}
    yield models
    mp.undo()


def prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(1, VOCAB, n)] for n in LENGTHS]


def tolerance(cm):
    return backend_for_target(cm.target).tolerance(cm.target, cm.options)


@pytest.mark.parametrize("target", list(TARGETS))
def test_ragged_generate_equals_each_prompt_alone(compiled, target):
    cm = compiled[target]
    ps = prompts()
    batch = cm.generate(ps, max_new_tokens=6).numpy()
    ids, mask = left_pad(ps)
    logits = cm(ids, attention_mask=mask).numpy()
    width = max(LENGTHS)
    for r, p in enumerate(ps):
        alone = cm.generate([p], max_new_tokens=6).numpy()[0]
        assert batch[r, width:].tolist() == alone[len(p):].tolist()
        assert batch[r, :width - len(p)].tolist() == [0] * (width - len(p))  # the left padding stays
        want = cm(np.array([p])).numpy()[0]
        problem = tolerance(cm).mismatch(logits[r, width - len(p):], want)
        assert problem is None, problem


def test_transformers_style_left_padding_with_attention_mask(compiled):
    cm = compiled["reference"]
    ps = prompts(1)
    ids, mask = left_pad(ps, pad_token_id=7)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=4).numpy()
    for r, p in enumerate(ps):
        assert out[r, ids.shape[1]:].tolist() == cm.generate([p], max_new_tokens=4).numpy()[0, len(p):].tolist()


def test_per_sequence_stopping_in_a_ragged_batch(compiled):
    cm = compiled["reference"]
    ps = prompts(2)
    free = cm.generate(ps, max_new_tokens=6).numpy()
    width = max(LENGTHS)
    eos = int(free[1, width + 1])  # row 1's second new token: row 1 stops there, padded after
    got = cm.generate(ps, max_new_tokens=6, eos_token_id=eos, pad_token_id=3).numpy()
    for r in range(len(ps)):
        new = free[r, width:].tolist()
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert got[r, width:width + stop].tolist() == new[:stop]
        assert set(got[r, width + stop:].tolist()) <= {3}


@pytest.mark.parametrize("target", list(TARGETS))
def test_decode_batch_rows_join_and_leave_bit_exact(compiled, target):
    """Rows admitted at different times and released mid-way: every logits vector equals,
    bit for bit, the same row decoded alone in a batch of one."""
    cm = compiled[target]
    ps = dict(zip("abcd", prompts(3)))

    def alone(p, steps):
        db = DecodeBatch(cm)
        out = [db.admit(0, p)]
        for _ in range(steps):
            out.append(db.step({0: int(np.argmax(out[-1]))})[0])
        return out

    got = {k: [] for k in ps}
    db = DecodeBatch(cm, max_rows=3)

    def step():
        for k, logits in db.step({k: int(np.argmax(got[k][-1])) for k in db.keys()}).items():
            got[k].append(logits)

    got["a"].append(db.admit("a", ps["a"]))
    got["b"].append(db.admit("b", ps["b"]))
    step()
    got["c"].append(db.admit("c", ps["c"]))
    step()
    step()
    db.release("b")
    got["d"].append(db.admit("d", ps["d"]))
    assert len(db) == 3 and db.keys() == ["a", "c", "d"]
    for _ in range(3):
        step()
    db.release("a")
    step()
    assert db.length("c") == len(ps["c"]) + 6 and db.length("d") == len(ps["d"]) + 4
    assert db.width == max(db.length("c"), db.length("d"))
    for k, seq in got.items():
        want = alone(ps[k], len(seq) - 1)
        for i, (g, w) in enumerate(zip(seq, want)):
            assert g.dtype == np.float32 and g.shape == (VOCAB,)
            assert np.array_equal(g, w), f"{target} row {k} step {i}: max diff {np.abs(g - w).max()}"


def test_decode_batch_refuses_bad_calls(compiled):
    cm = compiled["reference"]
    db = DecodeBatch(cm, max_rows=2)
    with pytest.raises(ValueError, match="non-empty"):
        db.admit("x", [])
    db.admit("x", [1, 2])
    with pytest.raises(ValueError, match="already in the batch"):
        db.admit("x", [3])
    db.admit("y", [4])
    with pytest.raises(ValueError, match="full"):
        db.admit("z", [5])
    with pytest.raises(ValueError, match="positions"):
        DecodeBatch(cm).admit("long", [1] * (cm.module.attr("max_positions") + 1))
    with pytest.raises(ValueError, match="exactly the admitted rows"):
        db.step({"x": 1})
    with pytest.raises(KeyError):
        db.release("nope")
    db.release("x")
    db.release("y")
    assert len(db) == 0 and db.step({}) == {}


@pytest.fixture(scope="module")
def unmasked(tmp_path_factory):
    """An artifact as compiled before attention masks: main has no attention_mask input."""
    mp = pytest.MonkeyPatch()
    mp.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ragged-cache"))
    from bitsmith.frontend import capture
    from bitsmith.passes import KVCache
    from bitsmith.runtime import CompiledModel
    captured = capture(make_model("llama"), None)
    module = KVCache(attention_mask=False).apply(captured.module)
    backend = backend_for_target("reference")
    yield CompiledModel(module, backend.build(module, "reference", {}), "reference")
    mp.undo()


def test_ragged_batch_on_an_artifact_without_the_mask_is_refused(unmasked, compiled):
    assert not has_attention_mask(unmasked.module) and has_attention_mask(compiled["reference"].module)
    ps = prompts()
    with pytest.raises(RaggedBatchError, match="no attention_mask input"):
        unmasked.generate(ps, max_new_tokens=2)
    # equal lengths still run, and equal the masked artifact's result
    same = [p[:2] for p in ps]
    assert unmasked.generate(same, max_new_tokens=3).tolist() == compiled["reference"].generate(same, max_new_tokens=3).tolist()
    # DecodeBatch falls back to one batch-1 cache per row there, with the same logits
    a, b = DecodeBatch(unmasked), DecodeBatch(compiled["reference"])
    for db in (a, b):
        db.admit(0, ps[0])
        db.admit(1, ps[1])
    sa, sb = a.step({0: 1, 1: 2}), b.step({0: 1, 1: 2})
    for r in (0, 1):
        assert np.array_equal(sa[r], sb[r])


def test_bad_attention_masks_are_refused(compiled):
    cm = compiled["reference"]
    ids, mask = left_pad(prompts())
    with pytest.raises(ValueError, match="shape of input_ids"):
        cm.generate(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="only 0"):
        cm.generate(ids, attention_mask=mask * 2)
    right = mask[:, ::-1]
    with pytest.raises(ValueError, match="pad on the left"):
        cm.generate(ids, attention_mask=right)
    with pytest.raises(ValueError, match="either a list"):
        cm.generate(prompts(), attention_mask=mask)


def test_main_without_a_mask_argument_attends_everywhere(compiled):
    """The mask is an optional input: run("main") without it equals an all-ones mask."""
    cm = compiled["reference"]
    from bitsmith.runtime.generate import empty_cache, positions
    ids = np.array([prompts()[0]])
    args = [ids, positions(1, 0, ids.shape[1]), *empty_cache(cm.module, 1)]
    without = cm.run("main", args)
    with_ones = run_function(cm.module, "main", [*args, np.ones(ids.shape, np.int64)])
    for a, b in zip(without, with_ones):
        assert np.array_equal(a, b)


def test_cli_run_with_several_prompts_of_different_lengths(capsys, tmp_path):
    """`bitsmith run --prompt A --prompt B ...` batches them; each reply equals the prompt run alone."""
    from bitsmith.cli import main
    from tiny_llama import save_tiny_llama

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    art = tmp_path / "art"
    run("compile", str(save_tiny_llama(tmp_path / "hf")), "--target", "reference", "--out", str(art))
    texts = ["w5 w17 w3", "w9", "w40 w41 w42 w43 w44 w45 w46"]
    batched = run("run", str(art), *[a for t in texts for a in ("--prompt", t)], "--max-new-tokens", "5")
    alone = [run("run", str(art), "--prompt", t, "--max-new-tokens", "5").strip() for t in texts]
    lines = batched.splitlines()
    assert lines[0::2] == [f"[{i}]" for i in range(1, len(texts) + 1)]
    assert [line.strip() for line in lines[1::2]] == alone and all(alone)


@pytest.mark.parametrize("mask_dtype", ["int64", "bool"])
def test_masked_attention_in_mlir_linalg_matches_interpreter(mask_dtype):
    """The exporter's linalg form (run in MLIR's ExecutionEngine) hides the masked keys and
    gives zeros for a row that sees none, as the interpreter does. float32 sums over <= 8 keys
    of O(1) terms: 1e-5 is the bound tests/test_mlir.py uses for the tiny Llama."""
    pytest.importorskip("torch_mlir.ir", reason="MLIR interop needs torch-mlir")
    from bitsmith.ir import evaluate
    from bitsmith.mlir import run_mlir
    g = GraphBuilder()
    q = g.param("q", TensorType((2, 4, 3, 8), "float32"))
    k = g.param("k", TensorType((2, 2, 6, 8), "float32"))
    v = g.param("v", TensorType((2, 2, 6, 8), "float32"))
    m = g.param("mask", TensorType((2, 6), mask_dtype))
    module = g.module([g.op("attention", (q, k, v, m), {"scale": 8 ** -0.5, "causal": True})])
    rng = np.random.default_rng(0)
    mask = np.array([[0, 0, 0, 0, 1, 1], [1, 0, 1, 1, 0, 1]]).astype(mask_dtype)  # row 0, query 0: no key
    args = [rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 3, 8), (2, 2, 6, 8), (2, 2, 6, 8))] + [mask]
    (want,) = evaluate(module, args)
    assert np.all(want[0, :, 0] == 0)
    np.testing.assert_allclose(want, oracle_attention(*args[:3], 8 ** -0.5, True, mask), rtol=1e-5, atol=1e-5)
    (got,) = run_mlir(module, args)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
