"""Length buckets (bitsmith.ir.length_buckets) and the length_adaptive pass."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitsmith.ir.length_buckets import BUCKETS_ATTR, LengthBucketError, LengthBuckets
from bitsmith.testing import check_pass

plans = st.builds(LengthBuckets, st.integers(1, 64), st.integers(1, 32), st.integers(2, 600))


@given(plans, st.data())
def test_every_length_lands_in_a_compiled_bucket_with_less_than_a_step_of_padding(plan, data):
    buckets = set(plan.buckets())
    seq = data.draw(st.integers(1, plan.max_length))
    b = plan.bucket(seq, 0)
    assert b in buckets and b.phase == "prefill" and 0 <= b.seq - seq < plan.prefill_step
    past = data.draw(st.integers(1, plan.max_length - 1))
    d = plan.bucket(1, past)
    assert d in buckets and d.phase == "decode" and 0 <= d.past - past < plan.kv_step


def test_bucket_counts_and_refusals():
    plan = LengthBuckets(128, 16, 2048)
    assert sum(b.phase == "prefill" for b in plan.buckets()) == 16
    assert sum(b.phase == "decode" for b in plan.buckets()) == 128
    with pytest.raises(LengthBucketError, match="exceeds max_length"):
        plan.bucket(2048, 1)
    with pytest.raises(LengthBucketError, match="fits no bucket"):
        plan.bucket(3, 5)
    with pytest.raises(LengthBucketError, match="kv_step must be"):
        LengthBuckets(128, 0, 16)


def test_pass_records_the_plan_and_keeps_numerics():
    from bitsmith.ir import parse_module
    from pathlib import Path
    text = (Path(__file__).parent / "passes/length_adaptive/kv-main.before.ir").read_text()
    module = parse_module(text)
    out = check_pass("length_adaptive{prefill_step=32,kv_step=8,max_length=100}", module, None, idempotent=True)
    out = out.module
    assert out.function("main").attr(BUCKETS_ATTR) == (32, 8, 100)
    assert out.function("helper").attr(BUCKETS_ATTR) is None
