"""The local-rewrite driver (bitsmith/passes/rewrite.py): patterns, the Rewriter's edits, fixed
point and one walk, dead-node removal, the iteration limit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import GraphBuilder, Module, Node, TensorType, Value, evaluate, verify_module
from bitsmith.ir.traits import COMMUTATIVE, ELEMENTWISE, PURE, has_trait
from bitsmith.passes import PASSES, get_pass
from bitsmith.passes import rewriter as rewriter_module
from bitsmith.passes.rewrite import (Pattern, PatternSet, RewriteError, RewriteLimitError, Rewriter,
                                     apply_patterns, pattern)
from bitsmith.testing.strategies import random_modules
from pass_checks import assert_same_results


def _producer_is(op: str):
    def where(node: Node, rw: Rewriter) -> bool:
        p = rw.producer(node.inputs[0])
        return p is not None and p.op == op
    return where


@pattern("sub")
def sub_to_add_neg(node: Node, rw: Rewriter) -> None:
    """a - b -> a + (-b): the same IEEE operation, so results stay bitwise equal."""
    a, b = node.inputs
    negated = rw.op("neg", [b], loc=node.loc, hint=f"{node.output.name}.neg")
    rw.replace(Node("add", (a, negated), node.outputs, (), node.loc))


@pattern("neg", where=_producer_is("neg"))
def double_negation(node: Node, rw: Rewriter) -> None:
    rw.replace_with_values(rw.producer(node.inputs[0]).inputs[0])


def _swappable(node: Node, rw: Rewriter) -> bool:
    a, b = (rw.type_of(i) for i in node.inputs)  # equal shapes or a rank-0 operand: same result type
    return node.op in ("add", "mul") and (a.shape == b.shape or a.rank == 0 or b.rank == 0)


@pattern(trait=COMMUTATIVE, where=lambda n, rw: _swappable(n, rw) and list(n.inputs) != sorted(n.inputs))
def order_operands(node: Node, rw: Rewriter) -> None:
    rw.replace(node.replace(inputs=tuple(sorted(node.inputs))))


CANONICAL = PatternSet([sub_to_add_neg, double_negation, order_operands])


def _nodes(module: Module) -> tuple[Node, ...]:
    return module.functions[0].nodes


def _uses(module: Module) -> dict[str, int]:
    fn = module.functions[0]
    out: dict[str, int] = {}
    for v in [i for n in fn.nodes for i in n.inputs] + list(fn.results):
        out[v] = out.get(v, 0) + 1
    return out


# ---------------------------------------------------------------- fixed point on random modules

@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_fixed_point_verifies_preserves_results_and_is_stable(case):
    module, args = case
    after = apply_patterns(module, CANONICAL, remove_dead=True)
    verify_module(after)
    assert_same_results(module, after, args)  # bitwise: each rewrite is an IEEE identity
    fn = after.functions[0]
    producers = fn.producers()
    assert not any(n.op == "sub" for n in fn.nodes)
    assert not any(n.op == "neg" and getattr(producers.get(n.inputs[0]), "op", "") == "neg" for n in fn.nodes)
    assert not any(_swappable_plain(after, n) and list(n.inputs) != sorted(n.inputs) for n in fn.nodes)
    assert apply_patterns(after, CANONICAL, remove_dead=True) is after  # nothing left to do
    assert apply_patterns(module, ()) is module


def _swappable_plain(module: Module, node: Node) -> bool:
    types = module.functions[0].value_types()
    if node.op not in ("add", "mul"):
        return False
    a, b = (types[i] for i in node.inputs)
    return a.shape == b.shape or a.rank == 0 or b.rank == 0


# ---------------------------------------------------------------- the Rewriter's edits

@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_replace_all_uses_leaves_no_use_of_the_old_value(case):
    """Every unary elementwise node's uses move to its input (not a semantics-preserving
    rewrite: this checks the bookkeeping against a recount of the result)."""
    module, _ = case
    seen: list[tuple[str, str]] = []

    def bypass(node: Node, rw: Rewriter) -> None:
        old, new = node.output.name, node.inputs[0]
        if rw.type_of(old) != rw.type_of(new) or not rw.has_uses(old):
            return
        users_before = {u.outputs[0].name for u in rw.users(old) + rw.users(new)}
        rw.replace_all_uses(old, new)
        assert rw.users(old) == [] and not rw.is_result(old) and not rw.has_uses(old)
        assert {u.outputs[0].name for u in rw.users(new)} == users_before
        seen.append((old, new))

    after = apply_patterns(module, [Pattern(bypass, trait=ELEMENTWISE, where=lambda n, rw: len(n.inputs) == 1)],
                           once=True)
    verify_module(after)
    uses = _uses(after)
    assert all(old not in uses for old, _ in seen)


@settings(max_examples=60, deadline=None)
@given(random_modules())
def test_dead_node_removal_keeps_results_and_removes_only_unused_pure_nodes(case):
    module, args = case
    fn = module.functions[0]
    live = set(fn.results)  # oracle: backward liveness over the original node list
    for node in reversed(fn.nodes):
        if any(o.name in live for o in node.outputs):
            live.update(node.inputs)
    want = [n for n in fn.nodes if any(o.name in live for o in n.outputs)]

    after = apply_patterns(module, (), remove_dead=True)
    assert list(_nodes(after)) == want and after.functions[0].results == fn.results
    assert_same_results(module, after, args)

    impure = "tanh"  # pretend one op has effects: its dead nodes must stay
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rewriter_module, "has_trait", lambda op, t: has_trait(op, t) and not (op == impure and t == PURE))
        kept = apply_patterns(module, (), remove_dead=True)
    kept_outputs = {o.name for n in _nodes(kept) for o in n.outputs}
    assert all(o.name in kept_outputs for n in fn.nodes if n.op == impure for o in n.outputs)
    assert set(n.outputs[0].name for n in want) <= kept_outputs


@settings(max_examples=40, deadline=None)
@given(random_modules(), st.data())
def test_fresh_names_never_collide(case, data):
    module, _ = case
    fn = module.functions[0]
    existing = [p.name for p in fn.params] + [o.name for n in fn.nodes for o in n.outputs]
    hints = data.draw(st.lists(st.sampled_from(existing) | st.sampled_from(["v", "x.1", "v.2"]), min_size=1,
                               max_size=12))
    given_out: list[str] = []

    def first_only(node: Node, rw: Rewriter) -> None:
        if not given_out:
            given_out.extend(rw.fresh(h) for h in hints)
            given_out.append(rw.op("neg", [node.output.name], hint=hints[0]))

    apply_patterns(module, [Pattern(first_only)], once=True)
    assert len(set(given_out)) == len(given_out)
    assert not set(given_out) & set(existing)


def test_fresh_follows_the_dotted_counter():
    b = GraphBuilder()
    x = b.param("x", TensorType((2,), "float32"))
    b.op("neg", [x], name="w")
    b.op("neg", [x], name="w.1")
    names: list[str] = []

    def grab(node: Node, rw: Rewriter) -> None:
        if not names:
            names.extend([rw.fresh("w"), rw.fresh("w"), rw.fresh("x"), rw.fresh("y")])

    apply_patterns(b.module(["w"]), [Pattern(grab)], once=True)
    assert names == ["w.2", "w.3", "x.1", "y"]


def test_constants_get_unique_table_names_and_verify():
    b = GraphBuilder()
    x = b.param("x", TensorType((2,), "float32"))
    b.constant("c", np.ones(2, np.float32))
    b.constant("p.codes", np.ones(2, np.float32))
    y = b.op("relu", [x])
    module = b.module([y])
    made: list[str] = []

    @pattern("relu")
    def add_constants(node: Node, rw: Rewriter) -> None:
        made.append(rw.add_tensor("c", np.full(2, 2, np.float32)))
        made.append(rw.add_tensor("c", np.full(2, 3, np.float32)))
        made.append(rw.add_tensors("p", {".codes": np.zeros(2, np.uint8), ".scales": np.ones(1, np.float16)}))
        value = rw.constant(made[0], hint="k", loc=node.loc)
        rw.replace(node.replace(op="add", inputs=(node.inputs[0], value)))

    after = verify_module(apply_patterns(module, [add_constants], once=True))
    assert made == ["c#1", "c#2", "p#1"]
    assert {"c#1", "c#2", "p#1.codes", "p#1.scales"} <= set(after.tensors)
    assert np.array_equal(after.tensors["c#1"], [2, 2]) and np.array_equal(module.tensors["c"], [1, 1])
    (got,) = evaluate(after, [np.array([1, -1], np.float32)])
    np.testing.assert_array_equal(got, np.array([1, -1], np.float32) + 2)  # x + the first new constant
    assert "c#1" not in module.tensors  # the input module is untouched


def test_uses_of_a_later_value_reorder_the_nodes_and_a_cycle_is_refused():
    b = GraphBuilder()
    x = b.param("x", TensorType((3,), "float32"))
    a = b.op("neg", [x])
    u = b.op("tanh", [a])
    later = b.op("relu", [x])
    module = b.module([u, later])

    @pattern("neg")
    def to_later(node: Node, rw: Rewriter) -> None:
        rw.replace_with_values(later)

    after = verify_module(apply_patterns(module, [to_later], once=True))
    assert [n.op for n in _nodes(after)] == ["relu", "tanh"]

    @pattern("neg")
    def to_own_user(node: Node, rw: Rewriter) -> None:
        rw.replace_all_uses(node.output.name, u)  # u reads a: a cycle

    with pytest.raises(RewriteError, match="cycle"):
        apply_patterns(module, [to_own_user], once=True)


def test_edit_errors_say_what_is_wrong():
    b = GraphBuilder()
    x = b.param("x", TensorType((3,), "float32"))
    a = b.op("neg", [x])
    s = b.op("sum", [a], {"axes": (0,), "keepdims": False})
    module = b.module([b.op("tanh", [a]), s])

    def attempt(edit) -> None:
        apply_patterns(module, [Pattern(edit, frozenset({"neg"}))], once=True)

    with pytest.raises(RewriteError, match="still used"):
        attempt(lambda n, rw: rw.erase())
    with pytest.raises(RewriteError, match="already defined"):
        attempt(lambda n, rw: rw.insert(Node("relu", (x,), (n.output,))))
    with pytest.raises(RewriteError, match="not defined"):
        attempt(lambda n, rw: rw.insert(Node("relu", ("nope",), (Value("z", n.output.type),))))
    with pytest.raises(RewriteError, match="must define %"):
        attempt(lambda n, rw: rw.replace(Node("sum", (x,), (Value(n.output.name, rw.type_of(s)),),
                                              {"axes": (0,), "keepdims": False})))
    with pytest.raises(RewriteError, match="cannot replace"):
        attempt(lambda n, rw: rw.replace_all_uses(n.output.name, s))
    with pytest.raises(ValueError, match="unknown op"):
        Pattern(lambda n, rw: None, frozenset({"nosuchop"}))
    with pytest.raises(ValueError, match="not both"):
        Pattern(lambda n, rw: None, frozenset({"neg"}), trait=PURE)


def test_a_trait_pattern_meets_only_ops_with_the_trait():
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    y = b.op("add", [b.op("mul", [x, x]), b.op("sum", [x], {"axes": (1,), "keepdims": True})])
    met: list[str] = []
    apply_patterns(b.module([y]), [Pattern(lambda n, rw: met.append(n.op), trait=COMMUTATIVE)], once=True)
    assert met == ["mul", "add"]


# ---------------------------------------------------------------- one walk, fixed point, limit

def _chain(op: str, length: int) -> Module:
    b = GraphBuilder()
    v = b.param("x", TensorType((2,), "float32"))
    for _ in range(length):
        v = b.op(op, [v])
    return b.module([v])


@pattern("relu")
def grow(node: Node, rw: Rewriter) -> None:
    """relu(x) -> relu(relu(x)): never converges."""
    inner = rw.op("relu", list(node.inputs))
    rw.replace(node.replace(inputs=(inner,)))


def test_once_visits_only_the_nodes_present_at_the_start():
    after = apply_patterns(_chain("relu", 5), [grow], once=True)
    assert [n.op for n in _nodes(after)] == ["relu"] * 10


def test_the_iteration_limit_names_the_patterns_that_did_not_converge():
    with pytest.raises(RewriteLimitError, match=r"after 20 rewrites .*grow on relu.*raise max_rewrites"):
        apply_patterns(_chain("relu", 3), [grow], max_rewrites=20)
    with pytest.raises(RewriteLimitError):  # the default limit is finite too
        apply_patterns(_chain("relu", 3), [grow])


def test_fixed_point_work_is_linear_in_the_function():
    """neg(neg(...)) 3000 deep collapses completely, each pattern check on a node a bounded
    number of times (a rescan per rewrite would be quadratic)."""
    checks = 0

    def counted(node: Node, rw: Rewriter) -> bool:
        nonlocal checks
        checks += 1
        return _producer_is("neg")(node, rw)

    n = 3000
    after = apply_patterns(_chain("neg", n), [Pattern(double_negation.rewrite, frozenset({"neg"}), where=counted)],
                           remove_dead=True)
    assert _nodes(after) == () and after.functions[0].results == ("x",)
    assert checks <= 3 * n


# ---------------------------------------------------------------- passes declared idempotent

IDEMPOTENT_CASES = {"quantize": {"scheme": "rtn-int4", "group_size": 2}, "sparsify": {"pattern": "1:2"}}
# passes that only run on data a random module cannot carry (their idempotence is tested there)
NEEDS_SOURCE = {"gguf-quantize": "needs a GGUF file's blocks (test_gguf.py::test_gguf_quantize_is_idempotent)"}


@pytest.mark.parametrize("name", sorted(n for n, cls in PASSES.items() if cls.idempotent))
@settings(max_examples=25, deadline=None)
@given(case=random_modules())
def test_passes_declared_idempotent_are(name, case):
    if name in NEEDS_SOURCE:
        pytest.skip(NEEDS_SOURCE[name])
    module, _ = case
    p = get_pass(name, **IDEMPOTENT_CASES.get(name, {}))
    try:
        once = p.apply(module)
    except ValueError:  # e.g. a weight shape the pass refuses; not what this test is about
        return
    assert p.apply(once) == once


def test_fold_takes_every_evaluable_source_as_known_and_keeps_the_sources():
    """Fold asks the SOURCE trait: a static ``arange`` feeds folding like a constant does (and
    stays itself); one with a symbolic end is left for run time."""
    b = GraphBuilder()
    x = b.param("x", TensorType(("seq",), "float32"))
    static = b.op("cast", [b.op("arange", [], {"start": 0, "end": 6, "step": 2, "dtype": "int64"})],
                  {"dtype": "float32"})
    symbolic = b.op("cast", [b.op("arange", [], {"start": 0, "end": "seq", "step": 1, "dtype": "int64"})],
                    {"dtype": "float32"})
    module = b.module([static, b.op("add", [x, symbolic])])
    after = get_pass("fold").apply(module)
    ops = {n.outputs[0].name: n.op for n in _nodes(after)}
    assert ops[static] == "constant" and ops[symbolic] == "cast"
    assert [n.op for n in _nodes(after)].count("arange") == 2
    args = [np.arange(4, dtype=np.float32)]
    assert_same_results(module, after, args)


def test_every_function_is_rewritten_with_one_tensor_table_and_functions_selects():
    def function(name: str) -> Module:
        b = GraphBuilder(name)
        x = b.param("x", TensorType((2,), "float32"))
        return b.module([b.op("sub", [x, x])])

    a, c = function("a"), function("c")
    module = Module(a.functions + c.functions)
    names: list[str] = []

    @pattern("sub")
    def with_constant(node: Node, rw: Rewriter) -> None:
        names.append(rw.add_tensor("zero", np.zeros(2, np.float32)))
        rw.replace(Node("constant", (), node.outputs, {"name": names[-1]}, node.loc))

    both = verify_module(apply_patterns(module, [with_constant]))
    assert names == ["zero", "zero#1"] and set(both.tensors) == {"zero", "zero#1"}
    only_c = verify_module(apply_patterns(module, [with_constant], functions={"c"}))
    assert only_c.functions[0] is module.functions[0] and only_c.functions[1].nodes[0].op == "constant"
