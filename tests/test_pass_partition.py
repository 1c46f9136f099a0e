"""partition and inline: outlined regions compute bit for bit what the original did, inlining
restores the original graph up to value names and order, and the cut report counts the bytes
the interpreter actually passes across each call."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.errors import PassError, UnknownOptionError
from bitsmith.ir import Function, GraphBuilder, Location, Module, TensorType, run_function, verify_module
from bitsmith.ir.traits import ALL_TRAITS
from bitsmith.passes import Inline, Partition, PassManager, get_pass
from bitsmith.passes.cut_report import cut_report, data_flow_graph
from bitsmith.passes.partition import find_regions, partition_module
from bitsmith.passes.partition_patterns import PARTITION_PATTERNS, register_partition_pattern
from bitsmith.testing.strategies import modules_with_calls, random_modules
from pass_checks import assert_bitwise_equal, assert_same_results, run_passes

import networkx as nx


def canonical(module: Module) -> tuple:
    """The module up to value names and the order of independent nodes: each value is known by
    the hash of what computes it (op, attributes, types, location and its inputs' hashes)."""
    def function(fn: Function) -> tuple:
        key = {p.name: f"param{i}:{p.type}" for i, p in enumerate(fn.params)}
        nodes = []
        for n in fn.nodes:
            text = repr((n.op, n.attrs, tuple(key[i] for i in n.inputs), tuple(o.type for o in n.outputs), n.loc))
            k = hashlib.sha256(text.encode()).hexdigest()
            nodes.append(k)
            key.update({o.name: f"{k}:{j}" for j, o in enumerate(n.outputs)})
        return fn.name, fn.attrs, tuple(p.type for p in fn.params), tuple(sorted(nodes)), tuple(key[r] for r in fn.results)
    return tuple(function(f) for f in module.functions), module.attrs, module.tensors


# ---------------------------------------------------------------- small examples

def _chain() -> Module:
    """linear -> tanh -> sigmoid -> linear -> relu -> add(., tanh): two elementwise regions."""
    b = GraphBuilder()
    x = b.param("x", TensorType(("batch", "seq", 4), "float32"))
    w = b.constant("w", np.random.default_rng(0).uniform(-1, 1, (4, 4)).astype(np.float32))
    h = b.op("linear", [x, w])
    a = b.op("tanh", [h], loc=Location("block.act", "m.py:3"))
    c = b.op("sigmoid", [a])
    d = b.op("linear", [c, w])
    e = b.op("relu", [d])
    return b.module([b.op("add", [e, a])])


def test_outlines_each_connected_region_with_its_cut():
    m = _chain()
    out = run_passes(m, get_pass("partition", trait="elementwise", device="vector"))
    main, f0, f1 = out.functions
    assert [f.name for f in out.functions] == ["main", "main.elementwise.0", "main.elementwise.1"]
    assert [n.op for n in main.nodes] == ["constant", "linear", "call", "linear", "call"]
    assert [n.op for n in f0.nodes] == ["tanh", "sigmoid"] and [n.op for n in f1.nodes] == ["relu", "add"]
    # region 0 returns tanh (read by the add outside it) and sigmoid; region 1 reads both sides
    assert f0.results == (f0.nodes[0].output.name, f0.nodes[1].output.name)
    assert len(f1.params) == 2
    assert f0.attr("device") == "vector" and f0.attr("partition") == "elementwise"
    assert main.nodes[2].loc == Location("block.act", "m.py:3")  # the call takes its region's location
    # the recorded cut: float32 [batch,seq,4] is 16*batch*seq bytes per value
    assert (f0.attr("cut_in_bytes"), f0.attr("cut_out_bytes")) == ("16*batch*seq", "32*batch*seq")
    args = [np.random.default_rng(1).uniform(-2, 2, (2, 3, 4)).astype(np.float32)]
    assert_same_results(m, out, args)
    assert canonical(run_passes(out, Inline())) == canonical(m)


def _cyclic() -> Module:
    """a = tanh(x); l = linear(a); c = add(a, l): {a, c} is connected, but outlining it whole
    would make the call both feed and read the linear."""
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 4), "float32"))
    a = b.op("tanh", [x])
    lin = b.op("linear", [a, b.constant("w", np.eye(4, dtype=np.float32))])
    return b.module([b.op("add", [a, lin])])


def test_a_region_that_would_close_a_cycle_is_split():
    m = _cyclic()
    fn = m.functions[0]
    matched = {i for i, n in enumerate(fn.nodes) if n.op in ("tanh", "add")}
    assert len(list(nx.weakly_connected_components(data_flow_graph(fn).subgraph(matched)))) == 1
    assert find_regions(fn, matched) == [[0], [3]]
    out = run_passes(m, get_pass("partition", trait="elementwise"))
    assert [n.op for n in out.functions[0].nodes] == ["call", "constant", "linear", "call"]
    assert_same_results(m, out, [np.arange(8, dtype=np.float32).reshape(2, 4) / 8])


def test_two_regions_that_feed_each_other_are_split():
    """A = {a1 -> a3, a2 -> a3}, B likewise; a1 -> x -> b2 and b1 -> y -> a2. Each region alone
    is convex, but contracting both closes A -> B -> A."""
    b = GraphBuilder()
    p = b.param("p", TensorType((3,), "float32"))
    w = b.constant("w", np.eye(3, dtype=np.float32))
    a1 = b.op("neg", [p])
    b1 = b.op("abs", [p])
    x = b.op("linear", [a1, w])
    y = b.op("linear", [b1, w])
    a2 = b.op("tanh", [y])
    b2 = b.op("sin", [x])
    a3 = b.op("add", [a1, a2])
    b3 = b.op("mul", [b1, b2])
    m = b.module([a3, b3])
    fn = m.functions[0]
    names = {n.output.name: i for i, n in enumerate(fn.nodes)}
    A, B = {names[v] for v in (a1, a2, a3)}, {names[v] for v in (b1, b2, b3)}
    regions = find_regions(fn, A | B)
    assert sorted(map(len, regions)) != [3, 3]  # something was split
    out = partition_module(m, lambda n, ix: n.output.name in {a1, a2, a3, b1, b2, b3}, "ab")[0]
    verify_module(out)
    assert_same_results(m, out, [np.array([0.5, -1.0, 2.0], np.float32)])


def test_nothing_matched_leaves_the_module_alone():
    m = _chain()
    assert run_passes(m, get_pass("partition", trait="attention")) == m


def test_partition_is_idempotent():
    once = run_passes(_chain(), get_pass("partition", trait="elementwise"))
    assert run_passes(once, get_pass("partition", trait="elementwise")) == once


@pytest.mark.parametrize("options, error, match", [
    ({}, PassError, "exactly one of"),
    ({"trait": "attention", "pattern": "attention"}, PassError, "exactly one of"),
    ({"trait": "fast"}, UnknownOptionError, "unknown op trait 'fast'"),
    ({"pattern": "nope"}, UnknownOptionError, "unknown partition pattern 'nope'; valid: .*attention_kv"),
])
def test_option_errors(options, error, match):
    with pytest.raises(error, match=match):
        Partition(**options).apply(_chain())


def test_pattern_table_is_extensible(monkeypatch):
    monkeypatch.setattr("bitsmith.passes.partition_patterns.PARTITION_PATTERNS", dict(PARTITION_PATTERNS))
    register_partition_pattern("squashers", "tanh and sigmoid")(lambda n, ix: n.op in ("tanh", "sigmoid"))
    with pytest.raises(ValueError, match="registered twice"):
        register_partition_pattern("squashers", "again")(lambda n, ix: False)
    out = run_passes(_chain(), get_pass("partition", pattern="squashers", codegen="fpga"))
    assert [n.op for n in out.functions[1].nodes] == ["tanh", "sigmoid"]
    assert out.functions[1].attr("codegen") == "fpga" and out.functions[1].attr("partition") == "squashers"


# ---------------------------------------------------------------- KV cache: attention vs attention_kv

def _cached_attention(layers: int = 2) -> Module:
    """Per layer: k, v = linear(x); cache appends concat(past, new); attention; a projection."""
    rng = np.random.default_rng(0)
    b = GraphBuilder()
    x = b.param("x", TensorType(("batch", 2, "seq", 8), "float32"))
    h = x
    presents = []
    for i in range(layers):
        pk = b.param(f"past_k{i}", TensorType(("batch", 1, "past", 8), "float32"))
        pv = b.param(f"past_v{i}", TensorType(("batch", 1, "past", 8), "float32"))
        w = [b.constant(f"l{i}.w{j}", rng.uniform(-1, 1, (8, 8)).astype(np.float32)) for j in range(3)]
        q = b.op("linear", [h, w[0]])
        kv = b.op("slice", [b.op("linear", [h, w[1]])], {"axis": 1, "start": 0, "end": 1, "step": 1})
        vv = b.op("slice", [b.op("linear", [h, w[2]])], {"axis": 1, "start": 1, "end": 2, "step": 1})
        k = b.op("concat", [pk, kv], {"axis": 2}, loc=Location(f"layers.{i}.attn", "m.py:9"))
        v = b.op("concat", [pv, vv], {"axis": 2})
        a = b.op("attention", [q, k, v], {"scale": 0.35, "causal": True}, loc=Location(f"layers.{i}.attn", "m.py:10"))
        h = b.op("add", [h, a])
        presents += [k, v]
    return b.module([h] + presents)


def _decode_args(past: int) -> list[np.ndarray]:
    rng = np.random.default_rng(past)
    shapes = [(1, 2, 1, 8)] + [(1, 1, past, 8)] * 4
    return [rng.uniform(-1, 1, s).astype(np.float32) for s in shapes]


def _crossing_bytes(module: Module, args: list[np.ndarray]) -> list[int]:
    """Per call of main, in node order: the bytes of the arrays the interpreter passes in and
    gets back (the oracle for the report)."""
    seen = {p.name: a for p, a in zip(module.function("main").params, args)}
    calls = []
    main_nodes = {id(n) for n in module.function("main").nodes}

    def observe(node, outs):
        seen.update({v.name: a for v, a in zip(node.outputs, outs)})
        if node.op == "call" and id(node) in main_nodes:
            calls.append(sum(seen[i].nbytes for i in dict.fromkeys(node.inputs)) + sum(a.nbytes for a in outs))

    run_function(module, "main", args, observe=observe)
    return calls


@pytest.mark.parametrize("spec, per_layer_ops", [
    ("partition{trait=attention}", ["attention"]),
    ("partition{pattern=attention}", ["attention"]),
    ("partition{pattern=attention_kv,device=attention}", ["concat", "concat", "attention"]),
])
def test_attention_regions_and_their_bytes(spec, per_layer_ops):
    m = _cached_attention()
    out = PassManager(spec).run(m)
    callees = out.functions[1:]
    assert len(callees) == 2 and all([n.op for n in f.nodes] == per_layer_ops for f in callees)
    report = cut_report(out)
    assert [c.callee for c in report.calls] == [f.name for f in callees]
    for past in (0, 5):
        args = _decode_args(past)
        assert_same_results(m, out, args)
        bindings = {"batch": 1, "seq": 1, "past": past}
        assert [c.nbytes(bindings) for c in report.calls] == _crossing_bytes(out, args)
        for f, c in zip(callees, report.calls):
            from bitsmith.ir.symbolic import evaluate as eval_dim
            assert eval_dim(f.attr("cut_in_bytes"), bindings) == c.bytes_in(bindings)
            assert eval_dim(f.attr("cut_out_bytes"), bindings) == c.bytes_out(bindings)
    if "attention_kv" in spec:
        # the cache stays behind the cut: per decode token only q, the new k/v rows and the
        # attention output are exchanged (4 * 8 floats * (2 + 1 + 1 + 2) heads), whatever the past
        assert {c.nbytes({"batch": 1, "seq": 1, "past": p}, exchanged_only=True)
                for c in report.calls for p in (0, 100)} == {4 * 8 * 6}
        assert callees[0].attr("device") == "attention"
    else:  # the full keys and values cross on every call: grows with the past
        assert report.calls[0].nbytes({"batch": 1, "seq": 1, "past": 100}, True) > \
            report.calls[0].nbytes({"batch": 1, "seq": 1, "past": 0}, True)
    assert canonical(run_passes(out, Inline())) == canonical(m)


def test_partitioned_module_saves_and_loads_as_a_reference_artifact(tmp_path):
    from artifact_helpers import compiled
    from bitsmith.runtime.artifact import load_artifact
    module = PassManager("partition{pattern=attention_kv,device=attention,codegen=fpga}").run(_cached_attention())
    compiled(module).save(tmp_path / "art")
    loaded = load_artifact(tmp_path / "art")
    assert loaded.module == module and loaded.module.functions[1].attr("codegen") == "fpga"
    args = _decode_args(3)
    assert_bitwise_equal(loaded.run("main", args), run_function(module, "main", args))


def test_generations_order_independent_calls():
    out = PassManager("partition{pattern=attention_kv}").run(_cached_attention())
    g0, g1 = (c.generation for c in cut_report(out).calls)
    assert g0 < g1  # layer 1 reads layer 0's output


# ---------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(random_modules(), st.sampled_from(sorted(ALL_TRAITS)))
def test_partition_by_any_trait_keeps_results_and_inlines_back(module_and_args, trait):
    module, args = module_and_args
    out = run_passes(module, get_pass("partition", trait=trait, device="d"))
    assert_same_results(module, out, args)
    assert canonical(run_passes(out, Inline())) == canonical(module)
    assert run_passes(out, get_pass("partition", trait=trait, device="d")) == out
    for f in out.functions[1:]:
        assert f.attr("partition") == trait and f.attr("device") == "d"


@settings(max_examples=60, deadline=None)
@given(random_modules(), st.data())
def test_partition_by_random_node_sets(module_and_args, data):
    """Arbitrary (often non-convex) node sets: split as needed, still a DAG, same results."""
    module, args = module_and_args
    fn = module.functions[0]
    chosen = set(data.draw(st.lists(st.sampled_from([n.outputs[0].name for n in fn.nodes]), max_size=8)))
    out, report = partition_module(module, lambda n, ix: n.outputs[0].name in chosen, "random")
    verify_module(out)
    assert_same_results(module, out, args)
    assert canonical(run_passes(out, Inline())) == canonical(module)
    assert len(report.calls) == len(out.functions) - 1


@settings(max_examples=60, deadline=None)
@given(modules_with_calls())
def test_inline_restores_modules_with_calls(sample):
    with_calls, original, args = sample
    assert_same_results(original, with_calls, args)
    flat = run_passes(with_calls, Inline())
    assert [f.name for f in flat.functions] == ["main"]
    assert not any(n.op == "call" for n in flat.functions[0].nodes)
    assert_same_results(original, flat, args)
    kept = run_passes(with_calls, get_pass("inline", keep_callees=True))
    assert [f.name for f in kept.functions] == [f.name for f in with_calls.functions]


@settings(max_examples=40, deadline=None)
@given(modules_with_calls(), st.sampled_from(sorted(ALL_TRAITS)))
def test_partition_of_modules_that_already_call(sample, trait):
    with_calls, original, args = sample
    out = run_passes(with_calls, get_pass("partition", trait=trait))
    assert_same_results(original, out, args)
