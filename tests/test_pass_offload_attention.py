"""offload_attention and kv_head_group against the reference interpreter: the split schedule
computes the unsplit function bit for bit (prefill, then a decode step on the returned cache);
a kv-head group program run on heads folded into the batch axis equals the full-head program;
the head split and the shard/merge of the runtime are exact inverses for any split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.errors import PassError
from bitsmith.ir import run_function
from bitsmith.opt import load_module
from bitsmith.passes import PassManager
from bitsmith.passes.kv_head_group import group_function
from bitsmith.passes.offload_attention import offload_report
from bitsmith.runtime.offload.schedule import head_split, merge, shard
from pass_checks import assert_bitwise_equal

CASE = Path(__file__).parent / "passes" / "offload_attention" / "two_layers.before.ir"


def _module():
    return load_module(CASE.read_text())


def _inputs(rng, batch: int, seq: int, past: int) -> list[np.ndarray]:
    x = rng.standard_normal((batch, 2, seq, 8)).astype(np.float32)
    return [x] + [rng.standard_normal((batch, 1, past, 8)).astype(np.float32) for _ in range(4)]


@settings(max_examples=25, deadline=None)  # each example runs the interpreter twice
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_split_schedule_is_bitwise_identical(batch, seq, past, seed):
    module = _module()
    split = PassManager("offload_attention").run(module)
    args = _inputs(np.random.default_rng(seed), batch, seq, past)
    assert_bitwise_equal(run_function(split, "main", args), run_function(module, "main", args))
    assert PassManager("offload_attention").run(split) == split  # idempotent
    report = offload_report(split, {"batch": batch, "seq": seq})
    # per layer: q (2 heads) + new k and v (1 head each) of 8 floats sent, the 2-head output back
    assert [(x.sent, x.received) for x in report.layers] == [(4 * 8 * (2 + 1 + 1) * batch * seq,
                                                             4 * 8 * 2 * batch * seq)] * 2


def test_inline_restores_the_computation():
    module = _module()
    back = PassManager("offload_attention,inline").run(module)
    args = _inputs(np.random.default_rng(0), 2, 3, 4)
    assert_bitwise_equal(run_function(back, "main", args), run_function(module, "main", args))
    assert {f.name for f in back.functions} == {"main"}


def test_needs_a_kv_cache():
    text = CASE.read_text()
    no_cache = load_module(text.replace("%k0 = concat(%past_k0, %kn0)", "%k0 = concat(%kn0, %kn0)")
                               .replace("%v0 = concat(%past_v0, %vn0)", "%v0 = concat(%vn0, %vn0)")
                               .replace("%k1 = concat(%past_k1, %kn1)", "%k1 = concat(%kn1, %kn1)")
                               .replace("%v1 = concat(%past_v1, %vn1)", "%v1 = concat(%vn1, %vn1)")
                               .replace("past+seq", "2*seq"))
    with pytest.raises(PassError, match="KV cache"):
        PassManager("offload_attention").run(no_cache)


@settings(deadline=None)
@given(st.integers(1, 8), st.data())
def test_head_split_shard_merge_round_trip(kv_heads, data):
    workers = data.draw(st.integers(1, kv_heads))
    group = data.draw(st.integers(1, 3))
    rows = data.draw(st.integers(1, 3))
    split = head_split(kv_heads, workers)
    sizes = [b - a for a, b in split]
    assert split[0][0] == 0 and split[-1][1] == kv_heads and max(sizes) - min(sizes) <= 1
    assert all(split[i][1] == split[i + 1][0] for i in range(workers - 1))
    x = np.arange(rows * kv_heads * group * 2 * 3, dtype=np.float32).reshape(rows, kv_heads * group, 2, 3)
    parts = [shard(x, "q", kv_heads, heads) for heads in split]
    for (a, b), p in zip(split, parts):  # row r*m + j of a part is row r, kv head a + j's group
        want = x.reshape(rows, kv_heads, group, 2, 3)[:, a:b].reshape(rows * (b - a), group, 2, 3)
        np.testing.assert_array_equal(p, want)
    np.testing.assert_array_equal(merge(parts, rows), x)


def test_kv_head_group_on_folded_heads_equals_full_heads():
    split = PassManager("offload_attention").run(_module())
    full = split.function("main.attention.0")
    # a 4-query-head / 2-kv-head copy of the layer, so that folding has something to fold
    text = (Path(__file__).parent / "passes" / "kv_head_group" / "fold_heads.before.ir").read_text()
    wide = load_module(text)
    fn = wide.function("main.attention.0")
    grouped = wide.replace(functions=(group_function(fn),))
    rng = np.random.default_rng(1)
    b, s, past = 2, 3, 4
    args = [rng.standard_normal(p.type.shape[:1] and tuple(
        {"batch": b, "seq": s, "past": past}.get(d, d) for d in p.type.shape)).astype(np.float32) for p in fn.params]
    want = run_function(wide, fn.name, args)
    roles = fn.attr("param_roles")
    folded = [shard(a, "q" if r == "q" else "kv", 2, (0, 2)) for a, r in zip(args, roles)]
    got = run_function(grouped, fn.name, folded)
    assert_bitwise_equal([merge([g], b) for g in got], want)
    assert full.attr("param_roles") == roles
