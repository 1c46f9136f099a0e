"""bitsmith.testing.check_pass: passes that keep their promises pass it; each broken promise
(a wrong rewrite, an ill-formed result, a false idempotence claim) is caught and named."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings

from bitsmith.ir import GraphBuilder, Module, TensorType
from bitsmith.passes import Pass
from bitsmith.passes.base import map_functions
from bitsmith.testing import PassCheckError, Tolerance, check_pass, random_modules
from bitsmith.testing.pass_check import example_args


@settings(max_examples=40, deadline=None)
@given(random_modules())
@pytest.mark.parametrize("spec", ["cse", "dce", "fold", "dce,cse,fold,dce"])
def test_exact_cleanup_passes_conform(spec, case):
    module, args = case
    result = check_pass(spec, module, args)
    assert result.passes == tuple(spec.split(","))


def _module() -> Module:
    b = GraphBuilder("main")
    b.param("x", TensorType(("batch", 3), "float32"))
    y = b.op("add", ["x", "x"])
    return b.module([b.op("tanh", [y])])


@dataclass(frozen=True)
class SwapOp(Pass):
    """Rewrites every ``frm`` node into ``to``: wrong unless the two ops agree."""

    name = "swap-op"
    frm: str = "add"
    to: str = "sub"

    def apply(self, module: Module) -> Module:
        return map_functions(module, lambda fn: fn.replace(
            nodes=tuple(n.replace(op=self.to) if n.op == self.frm else n for n in fn.nodes)))


@dataclass(frozen=True)
class Nudge(Pass):
    """Appends ``x + eps`` after the first result: a lossy pass, off by ``eps``."""

    name = "nudge"
    idempotent = True  # a false claim: each run adds another eps
    eps: float = 1e-6

    def apply(self, module: Module) -> Module:
        fn = module.functions[0]
        b = GraphBuilder(fn.name)
        for p in fn.params:
            b.param(p.name, p.type)
        b.nodes.extend(fn.nodes)
        b.types.update({v.name: v.type for n in fn.nodes for v in n.outputs})
        out = b.op("add", [fn.results[0], b.scalar(self.eps, "float32")])
        return module.replace(functions=(fn.replace(nodes=tuple(b.nodes), results=(out,) + fn.results[1:]),))


def test_a_wrong_rewrite_is_caught_with_the_pass_name():
    with pytest.raises(PassCheckError, match="swap-op changed the results of @main: result 0"):
        check_pass(SwapOp(), _module())


def test_an_ill_formed_result_is_caught():
    with pytest.raises(PassCheckError, match="swap-op.*ill-formed"):
        check_pass(SwapOp(to="no_such_op"), _module())


def test_a_lossy_pass_passes_within_its_stated_tolerance_only():
    args = example_args(_module())
    with pytest.raises(PassCheckError, match="differs in its bits"):
        check_pass(Nudge(eps=0.5), _module(), args, idempotent=False)
    check_pass(Nudge(eps=1e-6), _module(), args, tolerance=Tolerance(rtol=0, atol=1e-5), idempotent=False)
    with pytest.raises(PassCheckError, match="outside rtol=0 atol=1e-05"):
        check_pass(Nudge(eps=1e-3), _module(), args, tolerance=Tolerance(rtol=0, atol=1e-5), idempotent=False)


def test_a_false_idempotence_claim_is_caught_from_the_class_attribute():
    tol = Tolerance(rtol=0, atol=1e-5)
    with pytest.raises(PassCheckError, match="(?s)declares itself idempotent.*after two runs"):
        check_pass(Nudge(), _module(), tolerance=tol)  # reads Nudge.idempotent
    assert not check_pass(Nudge(), _module(), tolerance=tol, idempotent=False).idempotence_checked


def test_example_args_bind_symbolic_dims():
    (x,) = example_args(_module(), size=3)
    assert x.shape == (3, 3) and x.dtype == np.float32 and np.all(np.abs(x) <= 2)
