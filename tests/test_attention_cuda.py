"""tvm-cuda attention: split-KV decode with a unified max, tiled prefill (``attention_cuda``).

Default run (CPU): the numpy emulation of both algorithms (``attention_emulation``: same
chunking, same fallback rule, same combine, same tiles) against the reference interpreter's
float64 attention over shapes, GQA groups, masks, causal or not, chunk/tile sizes and
unified-max values that force the fallback; the fallback is shown to be needed; right-aligned
chunks make a row's result bit-identical with or without left padding; the kernel lowers for
tvm-cuda without a scores buffer. Slow: nvcc builds the kernels for sm_90. gpu: the kernels
run against the oracle (bundles from ``benchmarks/gpu_attention.py --build``, see there).

Tolerance of the emulation against the float64 oracle: |out - ref| <= 1e-5 * max|v|. Every
sum is float32 (unit roundoff 6e-8) over at most a few hundred terms of one sign (p >= 0), and
the result is a convex combination of v rows, so the error stays a few ulps of max|v|:
measured at most 7.8e-7 * max|v| over 600 random cases (fallback and plain, chunks of 8 and
128, tiles of 4 and 16, t up to 400; ``python tests/attention_emulation.py``), 1e-5 is 12x
that. A wrong chunk boundary, a dropped key, a bad rescale or a missed fallback moves the
output by O(max|v|) (or to inf/NaN).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_emulation import split_kv_attention, tiled_prefill_attention
from bitsmith.backends.tvm.attention_cuda import (DECODE_MAX_SEQ, DEFAULT_UNIFIED_MAX, PREFILL_KEYS, SPLIT,
                                                  UnifiedMax)
from bitsmith.ir.interpreter import causal_attention

TOL = 1e-5
HAS_NVCC = shutil.which("nvcc") is not None


def _case(draw, max_s: int, max_past: int):
    b = draw(st.integers(1, 2))
    kvh = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    d = draw(st.sampled_from([4, 8, 16, 64]))
    dv = draw(st.sampled_from([d, 8]))
    s = draw(st.integers(1, max_s))
    past = draw(st.integers(0, max_past))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    t = past + s
    q = (rng.standard_normal((b, kvh * g, s, d)) * draw(st.sampled_from([0.5, 1.0, 4.0]))).astype(np.float16)
    k = rng.standard_normal((b, kvh, t, d)).astype(np.float16)
    v = rng.standard_normal((b, kvh, t, dv)).astype(np.float16)
    mask = None
    if draw(st.booleans()):
        mask = (rng.random((b, t)) > draw(st.sampled_from([0.0, 0.3, 0.9]))).astype(draw(st.sampled_from(
            [np.int64, np.bool_])))
    return q, k, v, mask, float(d) ** -0.5, draw(st.booleans())


@st.composite
def decode_cases(draw):
    return _case(draw, DECODE_MAX_SEQ, 300)


@st.composite
def prefill_cases(draw):
    return _case(draw, 40, 40)


def _oracle(q, k, v, scale, causal, mask):
    return causal_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale, causal, mask)


def _check(out, ref, v):
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL * float(np.abs(v.astype(np.float32)).max()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(decode_cases(), st.sampled_from([SPLIT, 8, 32]),
       st.sampled_from([DEFAULT_UNIFIED_MAX, UnifiedMax(phi=-100.0), UnifiedMax(phi=100.0), UnifiedMax(phi=3.0)]))
def test_split_kv_unified_max_matches_softmax_attention(case, split, unified):
    """phi = -100 forces the overflow side of the fallback (x - phi > 60) on every chunk,
    phi = +100 the underflow side (max x - phi < -60); the chunk size of the kernel (128) and
    smaller ones that make many chunks per row."""
    q, k, v, mask, scale, causal = case
    out, stats = split_kv_attention(q, k, v, scale, causal, mask, unified, split)
    _check(out, _oracle(q, k, v, scale, causal, mask), v)
    if abs(unified.phi) >= 100:
        assert stats.fallbacks == stats.chunks
    if unified == DEFAULT_UNIFIED_MAX:  # scores of these inputs stay well inside phi +- 60
        assert stats.fallbacks == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefill_cases(), st.sampled_from([PREFILL_KEYS, 4, 7]))
def test_tiled_prefill_matches_softmax_attention(case, tile):
    q, k, v, mask, scale, causal = case
    _check(tiled_prefill_attention(q, k, v, scale, causal, mask, tile), _oracle(q, k, v, scale, causal, mask), v)


def _mixed_range_case():
    """Keys whose score scale grows to the right: the right chunks leave phi's window (their
    scores reach ~ +-900), the left ones stay inside it, so both kinds meet in the combine."""
    rng = np.random.default_rng(7)
    t, d = 5 * SPLIT, 16
    q = rng.standard_normal((1, 2, 1, d)).astype(np.float32)
    k = (rng.standard_normal((1, 1, t, d)) * np.where(np.arange(t) >= 3 * SPLIT, 60.0, 0.5)[None, None, :, None])
    v = rng.standard_normal((1, 1, t, d)).astype(np.float32)
    return q, k.astype(np.float32), v


def test_fallback_chunks_combine_with_unified_ones():
    q, k, v = _mixed_range_case()
    scale = 0.25
    out, stats = split_kv_attention(q, k, v, scale, True)
    assert 0 < stats.fallbacks < stats.chunks
    _check(out, _oracle(q, k, v, scale, True, None), v)


def test_without_the_fallback_the_unified_max_overflows():
    """The rule is needed: every chunk on phi = 0 with scores near 900 gives inf/NaN."""
    q, k, v = _mixed_range_case()
    out, _ = split_kv_attention(q, k, v, 0.25, True, fallback=False)
    assert not np.isfinite(out).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, DECODE_MAX_SEQ), st.booleans(),
       st.integers(0, 2**31))
def test_left_padding_changes_no_bit(length, pad, s, decode, seed):
    """A row alone and the same row behind ``pad`` masked columns (a ragged batch) give
    bit-identical results: chunks and tiles are counted from the right end and a chunk or tile
    with no visible key contributes nothing (docs/ragged-batches.md)."""
    rng = np.random.default_rng(seed)
    s = min(s, length) if decode else min(length, 24)
    d, h, kvh = 16, 3, 1
    q = rng.standard_normal((1, h, s, d)).astype(np.float16)
    k = rng.standard_normal((1, kvh, length, d)).astype(np.float16)
    v = rng.standard_normal((1, kvh, length, d)).astype(np.float16)
    junk = rng.standard_normal((1, kvh, pad, d)).astype(np.float16) * 50
    kp, vp = np.concatenate([junk, k], 2), np.concatenate([junk, v], 2)
    mask = np.concatenate([np.zeros((1, pad)), np.ones((1, length))], 1).astype(np.int64)
    run = (lambda *a: split_kv_attention(*a)[0]) if decode else tiled_prefill_attention
    alone = run(q, k, v, 0.25, True, np.ones((1, length), np.int64))
    padded = run(q, kp, vp, 0.25, True, mask)
    np.testing.assert_array_equal(alone, padded)


def test_scratch_dims_with_divisor_and_cap():
    import json
    from bitsmith.backends.tvm.cuda_runtime import decode_max_seq
    from bitsmith.backends.tvm.cuda_scratch import ScratchSpec
    from bitsmith.errors import BitsmithError
    spec = ScratchSpec(4, ((0, 0), 9, (0, 2, 1, 4), (1, 2, 128, 0), 64), "float32")
    assert ScratchSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    q, k = np.zeros((2, 9, 7, 64)), np.zeros((2, 3, 300, 64))
    assert spec.shape([q, k]) == (2, 9, 4, 3, 64)       # min(7, 4), ceil(300 / 128)
    assert spec.shape([q[:, :, :1], k[:, :, :128]]) == (2, 9, 1, 1, 64)
    assert decode_max_seq("k", [spec]) == 4
    with pytest.raises(BitsmithError):
        decode_max_seq("k", [ScratchSpec(4, ((0, 0),), "float32")])
    for bad in ([0, 2, 0, 4], [0, 2, 1, -1], [0, 2, 1]):
        with pytest.raises(BitsmithError):
            ScratchSpec.from_json({"position": 1, "dtype": "float32", "dims": [bad]})


# ---------------------------------------------------------------- lowering (CPU, no nvcc)

def _flash_kernel(mask_dtype="int64", dtype="float16", heads=9, kv_heads=3, d=64, dv=64, causal=True):
    from bitsmith.backends.tvm.attention_cuda import flash_attention_kernel
    return flash_attention_kernel(heads, kv_heads, d, dv, d ** -0.5, causal, dtype, mask_dtype)


def test_kernel_keeps_no_scores_buffer_and_has_both_functions():
    """SmolLM2's attention (9 query heads over 3 kv heads, head dim 64): CUDA C of both
    functions; every shared/local buffer is a fixed size (no kv_len x seq intermediate) and
    the only global scratch is the split buffers, sized by min(s, 4) x ceil(t / 128)."""
    import re
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    kdef = _flash_kernel()
    assert {gv.name_hint for gv in kdef.func.get_global_vars()} == {"main", "main_decode"}
    k = CudaCompiler(cuda_target("sm_90"), use_nvcc=False).compile(kdef)
    assert set(k.functions) == {"main", "main_decode"}
    assert [s.position for s in k.scratch] == [4, 5, 6]
    decls = re.findall(r"(?:__shared__ )?alignas\(\d+\) \w+ \w+\[(\w+)\]", k.source)
    assert decls and all(n.isdigit() and int(n) <= 64 * 64 for n in decls)
    assert "scores" not in k.source


def test_tvm_cuda_lowers_attention_to_the_flash_kernel():
    """tvm-cuda takes the attention rule of ``cuda_anchor_rules`` (GQA 9/3, mask), tvm-llvm keeps
    the TE kernel."""
    from bitsmith.backends.tvm.anchor_rules import cuda_anchor_rules
    from bitsmith.backends.tvm.lowering import lower_function
    from bitsmith.ir import Function, Module, Node, TensorType, Value
    params = (Value("q", TensorType(("batch", 9, "seq", 64), "float16")),
              Value("k", TensorType(("batch", 3, "kv", 64), "float16")),
              Value("v", TensorType(("batch", 3, "kv", 64), "float16")),
              Value("mask", TensorType(("batch", "kv"), "int64")))
    node = Node("attention", ("q", "k", "v", "mask"), (Value("o", TensorType(("batch", 9, "seq", 64), "float16")),),
                (("scale", 0.125), ("causal", True)))
    module = Module((Function("main", params, (node,), ("o",)),))
    plan, kdefs, _ = lower_function(module, module.function("main"), "tvm-cuda", cuda_anchor_rules())
    (kdef,) = kdefs.values()
    assert kdef.kind == "flash-attention" and len(kdef.scratch) == 3
    _, kdefs, _ = lower_function(module, module.function("main"), "tvm-llvm")
    assert [kd.kind for kd in kdefs.values()] == ["attention"]


# ---------------------------------------------------------------- slow: nvcc for sm_90

@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not on PATH")
@pytest.mark.parametrize("mask_dtype,dtype,causal", [("int64", "float16", True), (None, "float32", False)])
def test_kernels_build_with_nvcc_for_sm90(mask_dtype, dtype, causal, tmp_path):
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    k = CudaCompiler(cuda_target("sm_90"), directory=tmp_path).compile(_flash_kernel(mask_dtype, dtype, causal=causal))
    assert k.fatbin and k.ptx
    assert ".target sm_90" in k.ptx
    entries = [line for line in k.ptx.splitlines() if line.startswith(".visible .entry")]
    assert len(entries) == 3  # prefill; decode split + combine
    assert "ld.local" not in k.ptx  # the per-row state stays in registers


# ---------------------------------------------------------------- gpu: the kernels against the oracle

def _bundles() -> Path | None:
    pre = os.environ.get("BITSMITH_CUDA_PREBUILT")
    return Path(pre) / "attention" if pre and (Path(pre) / "attention").is_dir() else None


@pytest.mark.gpu
def test_kernels_match_reference_on_gpu(tmp_path):
    """Every correctness case of ``benchmarks/gpu_attention.py`` (SmolLM2 shape decode and
    prefill, fp16 KV cache, masks with padding, a fallback-forcing case) against the float64
    oracle, tolerance per case as stated there (fp16 output rounding + float32 sums)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_attention
    from bitsmith.backends.tvm.cuda_runtime import gpu_available
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    bundles = _bundles()
    if bundles is None:
        bundles = tmp_path / "attention"
        gpu_attention.build(bundles, "sm_90")
    failures = gpu_attention.check_all(bundles, trust_native_code=_bundles() is not None)
    assert not failures, failures


def test_fp16_kv_cache_stays_fp16_between_steps():
    """The executor hands ``present_*`` back in the dtype of the matching ``past_*`` parameter
    (fp16 under act_dtype float16), which is what ``empty_cache`` allocates for step 0: the
    host cache keeps one dtype across steps. Logits (and a present whose past has another
    dtype) come back as float32 like every target's."""
    from bitsmith.backends.tvm.cuda_target import kv_state_results
    from bitsmith.ir import Function, Module, Node, TensorType, Value
    from bitsmith.runtime.generate import empty_cache
    past = TensorType(("batch", 2, "past", 8), "float16")
    params = (Value("input_ids", TensorType(("batch", "seq"), "int64")),
              Value("position_ids", TensorType(("batch", "seq"), "int64")),
              Value("past_key_0", past), Value("past_value_0", past))
    full = TensorType(("batch", 2, "past+seq", 8), "float16")
    nodes = (Node("concat", ("past_key_0", "past_key_0"), (Value("present_key_0", full),), (("axis", 2),)),
             Node("concat", ("past_value_0", "past_value_0"), (Value("present_value_0", full),), (("axis", 2),)),
             Node("cast", ("present_key_0",), (Value("logits", TensorType(("batch", 2, "past+seq", 8), "float16")),),
                  (("dtype", "float16"),)))
    module = Module((Function("main", params, nodes, ("logits", "present_key_0", "present_value_0")),))
    assert kv_state_results(module, "main") == frozenset({1, 2})
    assert [c.dtype for c in empty_cache(module, 3)] == [np.float16, np.float16]
