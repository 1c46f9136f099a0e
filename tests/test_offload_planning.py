"""Offload cost model and planner: roofline numbers against formulas derived here, transfer
bytes against cut_report, planner properties, preset errors, and the CLI end to end."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitsmith.cli import main as cli_main
from bitsmith.ir import GraphBuilder, TensorType
from bitsmith.ir import symbolic as sym
from bitsmith.offload_planning.cost_model import (Assumptions, Group, homogeneous_step, max_batch_homogeneous,
                                                  max_batch_offload, offload_step)
from bitsmith.offload_planning.planner import PlanSettings, best_homogeneous, best_offload
from bitsmith.offload_planning.presets import (DevicePreset, LinkPreset, PresetError, builtin_presets,
                                               load_presets)
from bitsmith.offload_planning.profile import decode_bindings, decode_profile
from bitsmith.offload_planning.roofline import AS_IR, FP16, function_costs
from bitsmith.offload_planning.sources import partitioned
from bitsmith.offload_planning.synthetic import SHAPES, LlamaShape, synthetic_llama
from bitsmith.passes.cut_report import cut_report

TINY = LlamaShape(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100)

shapes = st.builds(
    lambda hd, kv, group, layers, ffn, vocab, tie: LlamaShape(hd * kv * group, ffn, layers, kv * group, kv, vocab,
                                                               tie_word_embeddings=tie),
    hd=st.sampled_from([8, 16]), kv=st.integers(1, 3), group=st.integers(1, 3), layers=st.integers(1, 3),
    ffn=st.integers(8, 96), vocab=st.integers(16, 200), tie=st.booleans())


@functools.lru_cache(maxsize=None)
def _profile(shape: LlamaShape, sizes=AS_IR):
    return decode_profile(partitioned(synthetic_llama(shape)), sizes)


# ---------------------------------------------------------------- roofline against formulas


@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 40), lead=st.integers(1, 3))
def test_linear_cost_is_2mnk_and_operand_bytes(m, k, n, lead):
    b = GraphBuilder()
    x = b.param("x", TensorType((lead, m, k), "float32"))
    w = b.constant("w", np.zeros((n, k), np.float32))
    b.op("linear", [x, w])
    cost = function_costs(b.function([]))[-1]
    assert cost.flops == 2 * lead * m * n * k
    assert cost.bytes == 4 * (lead * m * k + n * k + lead * m * n)  # x read, W read, y written
    fp16 = function_costs(b.function([]), FP16)[-1]
    assert fp16.bytes == 2 * (lead * m * k + n * k + lead * m * n)


@given(batch=st.integers(1, 4), kv=st.integers(1, 3), group=st.integers(1, 3), s=st.integers(1, 3),
       t=st.integers(1, 50), d=st.sampled_from([4, 8]))
def test_attention_cost(batch, kv, group, s, t, d):
    hq = kv * group
    b = GraphBuilder()
    q = b.param("q", TensorType((batch, hq, s, d), "float32"))
    k = b.param("k", TensorType((batch, kv, t, d), "float32"))
    v = b.param("v", TensorType((batch, kv, t, d), "float32"))
    b.op("attention", [q, k, v], {"scale": 1.0, "causal": True})
    cost = function_costs(b.function([]))[-1]
    scores = batch * hq * s * t
    assert cost.flops == scores * 2 * d * 2 + 5 * scores  # q k^T, p v, softmax
    assert cost.bytes == 4 * (2 * batch * hq * s * d + 2 * batch * kv * t * d)


@given(shape=shapes, batch=st.integers(1, 8), context=st.integers(1, 300))
@settings(max_examples=25, deadline=None)
def test_decode_flops_bytes_and_cache_from_the_config(shape, batch, context):
    """Independent of the IR walk: linear FLOPs are 2 per weight per token; the KV cache is
    2 * layers * kv_heads * head_dim values per token; q, k, v go out and the output comes back."""
    prof = _profile(shape)
    s, hd = shape, shape.dim_per_head
    per_layer = (s.hidden_size * s.num_attention_heads * hd * 2 + s.hidden_size * s.num_key_value_heads * hd * 2
                 + 3 * s.hidden_size * s.intermediate_size)
    linear_params = s.num_hidden_layers * per_layer + s.vocab_size * s.hidden_size
    module = partitioned(synthetic_llama(shape))
    main = module.function("main")
    linear_flops = sum(sym.evaluate(c.flops, decode_bindings(batch, context)) for c in function_costs(main)
                       if c.op == "linear")
    assert linear_flops == 2 * batch * linear_params
    kv = 2 * s.num_hidden_layers * s.num_key_value_heads * hd * 4
    assert prof.kv_bytes_per_sequence(context) == kv * context
    sent, received = prof.transfer_bytes(decode_bindings(batch, context))
    assert sent == 4 * batch * s.num_hidden_layers * (s.num_attention_heads + 2 * s.num_key_value_heads) * hd
    assert received == 4 * batch * s.num_hidden_layers * s.num_attention_heads * hd
    weights = 4 * (linear_params + (0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size)
                   + (2 * s.num_hidden_layers + 1) * s.hidden_size + hd // 2)
    assert prof.dense_weight_bytes == weights
    attn_flops, _ = prof.attention.totals(decode_bindings(batch, context))
    scores = batch * s.num_attention_heads * (context + 1)
    assert attn_flops == s.num_hidden_layers * scores * (4 * hd + 5)


@given(shape=shapes, batch=st.integers(1, 6), context=st.integers(0, 100))
@settings(max_examples=20, deadline=None)
def test_transfer_bytes_equal_the_cut_report(shape, batch, context):
    module = partitioned(synthetic_llama(shape))
    prof = decode_profile(module)
    report = cut_report(module)
    bindings = decode_bindings(batch, context)
    assert sum(prof.transfer_bytes(bindings)) == report.nbytes(bindings, exchanged_only=True)
    assert prof.layers == len(report.calls) == shape.num_hidden_layers


# ---------------------------------------------------------------- planner properties

devices = st.builds(
    lambda f, bw, mem, price, name: DevicePreset(name, name, f, bw, mem, price, "test", "test"),
    f=st.floats(1e9, 1e15), bw=st.floats(1e9, 5e12), mem=st.floats(1e6, 1e11), price=st.floats(0.1, 20),
    name=st.sampled_from(["c", "m"]))


@given(shape=shapes, compute=devices, memory=devices, bw=st.floats(1e8, 1e11), factor=st.floats(1.0, 100.0),
       latency=st.floats(0, 1e-4), context=st.integers(1, 4096), batch=st.integers(1, 64),
       k=st.integers(1, 4), n=st.integers(1, 4), stagger=st.booleans())
@settings(max_examples=30, deadline=None)
def test_more_link_bandwidth_never_lowers_throughput(shape, compute, memory, bw, factor, latency, context, batch,
                                                      k, n, stagger):
    prof = _profile(shape, FP16)
    slow, fast = LinkPreset("s", bw, latency, "t"), LinkPreset("f", bw * factor, latency, "t")
    cg, mg = Group(compute, k), Group(memory, n)
    assert offload_step(prof, cg, mg, fast, batch, context, stagger).step <= \
        offload_step(prof, cg, mg, slow, batch, context, stagger).step
    plan_settings = PlanSettings(max_group=2, max_attention=3)
    a = best_offload(prof, compute, memory, slow, context, settings=plan_settings)
    b = best_offload(prof, compute, memory, fast, context, settings=plan_settings)
    assert (a is None) == (b is None)
    if a is not None:
        assert b.tokens_per_dollar >= a.tokens_per_dollar * (1 - 1e-12)


@given(shape=shapes, device=devices, context=st.integers(1, 4096), longer=st.integers(1, 4096),
       batch=st.integers(1, 64))
@settings(max_examples=30, deadline=None)
def test_longer_context_never_raises_homogeneous_throughput(shape, device, context, longer, batch):
    prof = _profile(shape, FP16)
    g = Group(device, 1)
    assert homogeneous_step(prof, g, batch, context + longer).step >= homogeneous_step(prof, g, batch, context).step
    plan_settings = PlanSettings(max_group=4)
    short = best_homogeneous(prof, device, context, settings=plan_settings)
    long = best_homogeneous(prof, device, context + longer, settings=plan_settings)
    if long is not None:
        assert short is not None
        assert long.tokens_per_dollar <= short.tokens_per_dollar * (1 + 1e-12)


@given(shape=shapes, compute=devices, memory=devices, context=st.integers(1, 8192),
       util=st.floats(0.5, 1.0), batches=st.none() | st.lists(st.integers(1, 5000), min_size=1, max_size=3))
@settings(max_examples=30, deadline=None)
def test_chosen_batch_never_exceeds_memory(shape, compute, memory, context, util, batches):
    prof = _profile(shape, FP16)
    plan_settings = PlanSettings(max_group=4, max_attention=4, assumptions=Assumptions(util))
    link = builtin_presets().link("100gbps")
    kv = prof.kv_bytes_per_sequence(context)
    off = best_offload(prof, compute, memory, link, context, batches, plan_settings)
    if off is not None:
        assert prof.dense_weight_bytes <= compute.memory_bytes * off.compute_count * util
        assert off.batch * kv <= memory.memory_bytes * off.memory_count * util
        assert off.batch <= max_batch_offload(prof, Group(compute, off.compute_count),
                                              Group(memory, off.memory_count), context, Assumptions(util))
    homo = best_homogeneous(prof, compute, context, batches, plan_settings)
    if homo is not None:
        assert prof.dense_weight_bytes + homo.batch * kv <= compute.memory_bytes * homo.compute_count * util
    elif batches is None:
        assert all(max_batch_homogeneous(prof, Group(compute, k), context, Assumptions(util)) == 0 for k in (1, 2, 4))


def test_staggering_overlaps_when_sides_balance():
    """Two equal halves over three busy resources: the step is no longer than the serial one,
    and at least the busiest resource's total (derived from the cost model's own parts)."""
    prof = _profile(SHAPES["llama2-7b"], FP16)
    p = builtin_presets()
    cg, mg, link = Group(p.device("h100-sxm"), 1), Group(p.device("h20"), 2), p.link("400gbps")
    serial = offload_step(prof, cg, mg, link, 64, 4096, stagger=False)
    staggered = offload_step(prof, cg, mg, link, 64, 4096, stagger=True)
    assert staggered.step < serial.step
    half = offload_step(prof, cg, mg, link, 32, 4096, stagger=False)
    assert math.isclose(staggered.step, max(2 * half.dense, 2 * half.attention, 2 * half.transfer, half.step))


# ---------------------------------------------------------------- presets


def test_builtin_presets_have_every_required_entry():
    p = builtin_presets()
    assert {"h100-sxm", "a100-80gb", "h20", "cpu-server"} <= set(p.devices)
    assert {"100gbps", "200gbps", "400gbps"} <= set(p.links)
    for link, gbps in (("100gbps", 100), ("200gbps", 200), ("400gbps", 400)):
        assert p.link(link).bandwidth == gbps * 1e9 / 8


@pytest.mark.parametrize("entry, field", [
    ({"peak_flops": 1.0, "memory_bandwidth": 1.0, "memory_bytes": 1.0, "dollars_per_hour": 1.0,
      "description": "d", "source": "s"}, "devices.x.price_source"),
    ({"peak_flops": -1.0, "memory_bandwidth": 1.0, "memory_bytes": 1.0, "dollars_per_hour": 1.0,
      "description": "d", "source": "s", "price_source": "p"}, "devices.x.peak_flops"),
    ({"memory_bandwidth": 1.0, "memory_bytes": 1.0, "dollars_per_hour": 1.0,
      "description": "d", "source": "s", "price_source": "p"}, "devices.x.peak_flops"),
    ({"peak_flops": "fast", "memory_bandwidth": 1.0, "memory_bytes": 1.0, "dollars_per_hour": 1.0,
      "description": "d", "source": "s", "price_source": "p"}, "devices.x.peak_flops"),
])
def test_preset_errors_name_the_file_and_field(tmp_path, entry, field):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"format": "bitsmith-offload-presets/1", "devices": {"x": entry}}))
    with pytest.raises(PresetError) as e:
        load_presets(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_unknown_preset_keys_are_named(tmp_path):
    path = tmp_path / "typo.json"
    entry = {"peak_flops": 1.0, "memory_bandwidth": 1.0, "memory_bytes": 1.0, "dollars_per_hour": 1.0,
             "description": "d", "source": "s", "price_source": "p", "op_overheads": 1e-6}
    path.write_text(json.dumps({"format": "bitsmith-offload-presets/1", "devices": {"x": entry}}))
    with pytest.raises(PresetError, match=r"typo.json: devices\.x\.op_overheads: unknown key"):
        load_presets(path)


@given(shape=shapes, batch=st.integers(1, 8), context=st.integers(1, 500), overhead=st.floats(1e-7, 1e-3))
@settings(max_examples=20, deadline=None)
def test_op_overhead_is_paid_once_per_costed_op(shape, batch, context, overhead):
    prof = _profile(shape)
    b = decode_bindings(batch, context)
    for side in (prof.dense, prof.attention):
        extra = side.seconds(b, 1e12, 1e11, overhead) - side.seconds(b, 1e12, 1e11)
        costed = sum(1 for f in partitioned(synthetic_llama(shape)).functions
                     if (f.attr("partition") is None) == (side is prof.dense)
                     for c in function_costs(f) if c.flops != 0 or c.bytes != 0)
        assert math.isclose(extra, costed * overhead, rel_tol=1e-9)


def test_preset_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PresetError, match="bad.json"):
        load_presets(bad)
    with pytest.raises(PresetError, match="missing.json"):
        load_presets(tmp_path / "missing.json")
    link = tmp_path / "link.json"
    entry = {"bandwidth": 0, "latency": 0, "source": "s"}
    link.write_text(json.dumps({"format": "bitsmith-offload-presets/1", "links": {"l": entry}}))
    with pytest.raises(PresetError, match=r"link.json: links\.l\.bandwidth"):
        load_presets(link)


def test_a_user_preset_adds_and_replaces(tmp_path):
    path = tmp_path / "mine.json"
    entry = {"peak_flops": 1e12, "memory_bandwidth": 1e11, "memory_bytes": 1e10, "dollars_per_hour": 0.5,
             "description": "d", "source": "s", "price_source": "p"}
    path.write_text(json.dumps({"format": "bitsmith-offload-presets/1", "devices": {"h20": entry, "new": entry}}))
    p = load_presets(path)
    assert p.device("h20").dollars_per_hour == 0.5 and p.device("new").peak_flops == 1e12
    assert p.device("h100-sxm") == builtin_presets().device("h100-sxm")


# ---------------------------------------------------------------- CLI


def _tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"hidden_size": TINY.hidden_size, "intermediate_size": TINY.intermediate_size,
                                "num_hidden_layers": TINY.num_hidden_layers,
                                "num_attention_heads": TINY.num_attention_heads,
                                "num_key_value_heads": TINY.num_key_value_heads, "vocab_size": TINY.vocab_size,
                                "model_type": "llama"}))
    return path


def test_cli_plan_offload_json(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert cli_main(["plan-offload", str(cfg), "--context", "64,256", "--json", "--compute", "a100-80gb"]) == 0
    out = json.loads(capsys.readouterr().out)
    prof = _profile(TINY, FP16)
    assert out["model"]["kv_bytes_per_token"] == prof.kv_bytes_per_sequence(1)
    assert [r["context"] for r in out["rows"]] == [64, 256]
    for row in out["rows"]:
        off, homo = row["offload"], row["homogeneous"]
        assert math.isclose(row["ratio"], off["tokens_per_dollar"] / homo["tokens_per_dollar"])
        assert off["compute"] == "a100-80gb" and off["memory"] == "h20"


def test_cli_plan_offload_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = _tiny_config(tmp_path)
    png = tmp_path / "plan.png"
    assert cli_main(["plan-offload", str(cfg), "--context", "128", "--batch", "4,8", "--no-stagger",
                     "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.count("\n| 128 |") == 2 and "staggering off" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plan_offload_errors(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    assert cli_main(["plan-offload", str(cfg), "--link", "9gbps"]) == 2
    assert "9gbps" in capsys.readouterr().err
    assert cli_main(["plan-offload", str(cfg), "--presets", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


# ---------------------------------------------------------------- captured models and artifacts


@pytest.mark.slow
def test_synthetic_shape_matches_the_captured_model_and_its_artifact(tmp_path):
    """The synthetic builder against the frontend: a random-init Llama captured, compiled for
    the reference target and saved gives the same profile, read back from the artifact DIR,
    as the synthetic module of its config (same op costs, transfers, cache and weights)."""
    pytest.importorskip("torch")
    import bitsmith
    from bitsmith.offload_planning.sources import load_model
    from bitsmith.testing.hf_configs import make_model

    model = make_model("llama")
    bitsmith.compile(model, "reference").save(tmp_path / "art")
    _, module = load_model(str(tmp_path / "art"))
    captured = decode_profile(module)
    synthetic = _profile(LlamaShape.from_config(model.config.to_dict()))
    for batch, context in ((1, 1), (3, 17), (8, 200)):
        bindings = decode_bindings(batch, context)
        assert captured.dense.totals(bindings) == synthetic.dense.totals(bindings)
        assert captured.attention.totals(bindings) == synthetic.attention.totals(bindings)
        assert captured.transfer_bytes(bindings) == synthetic.transfer_bytes(bindings)
        assert captured.kv_bytes_per_sequence(context) == synthetic.kv_bytes_per_sequence(context)
    assert captured.dense_weight_bytes == synthetic.dense_weight_bytes
    assert (captured.layers, captured.kv_heads) == (synthetic.layers, synthetic.kv_heads)
