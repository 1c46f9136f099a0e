"""IR function -> FunctionPlan + the KernelDefs its steps call.

Fusible ops (``fused_rules.FUSED_RULES``) are grouped by ``fusion.group_nodes`` and each group
becomes one kernel; anchor ops (``anchor_rules.ANCHOR_RULES``) emit their own steps. A group
made only of reshapes of materialised values becomes numpy views. An op with neither rule
raises UnsupportedOpError naming the op, the node's location and the target.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
from tvm import te

from ...errors import UnsupportedOpError
from ...ir import Module
from ...ir.graph import Function, Node
from ...ir.traits import LITERAL, has_trait, ops_with
from ...ir.types import numpy_dtype
from ..base import LegalOps
from .anchor_rules import ANCHOR_RULES, attrs_reason
from .fused_rules import FUSED_RULES, RuleContext
from .fusion import Step, group_nodes
from .kernel import KernelDef
from .lazy import Lazy, from_tensor, materialize
from .plan import EXTERN_PREFIX, Call, Const, FunctionPlan, View, checked_kernel_key
from .symbols import DimEnv


def is_plan_constant(node: Node) -> bool:
    """LITERAL ops (constants, scalars) become plan constants, not steps."""
    return has_trait(node.op, LITERAL)


def legal_ops() -> LegalOps:
    """What ``lower_function`` accepts: plan constants and ops with an anchor or fused rule,
    with the attribute limits of the anchor rules."""
    return LegalOps(ops_with(LITERAL) | frozenset(ANCHOR_RULES) | frozenset(FUSED_RULES), attrs_reason)


class LoweringContext:
    """Slots, shapes, constants and kernels of the plan being built."""

    def __init__(self, module: Module, fn: Function, target: str) -> None:
        self.module, self.fn, self.target = module, fn, target
        self.slots: dict[str, int] = {}
        self.types = fn.value_types()
        self.producers = fn.producers()
        self.plan = FunctionPlan(fn.name, 0, [], [], [], [])
        self.kernels: dict[str, KernelDef] = {}
        self._shape_ids: dict[tuple, int] = {}
        self.const_arrays: dict[int, np.ndarray] = {}  # derived constants computed while lowering

    def slot(self, value: str) -> int:
        if value not in self.slots:
            self.slots[value] = self.new_slot()
        return self.slots[value]

    def new_slot(self) -> int:
        self.plan.num_slots += 1
        return self.plan.num_slots - 1

    def shape_id(self, dims) -> int:
        key = tuple(dims)
        if key not in self._shape_ids:
            self._shape_ids[key] = len(self.plan.shapes)
            self.plan.shapes.append(list(key))
        return self._shape_ids[key]

    def out(self, slot: int, dims, dtype: str) -> tuple[int, int, str]:
        return (slot, self.shape_id(dims), np.dtype(numpy_dtype(dtype)).name)

    def call(self, kdef: KernelDef, inputs: list[int], outputs: list[tuple[int, int, str]],
             check_ids: tuple[int, int] | None = None) -> None:
        key = kdef.digest()
        self.kernels.setdefault(key, kdef)
        self.plan.steps.append(Call(key, inputs, outputs, check_ids, kdef.name))

    def extern_call(self, name: str, inputs: list[int], outputs: list[tuple[int, int, str]]) -> None:
        """A step the executable runs with its own callable ``fn(*inputs, *outputs)``."""
        self.plan.steps.append(Call(checked_kernel_key(EXTERN_PREFIX + name), inputs, outputs, None, name))

    def view(self, src: int, dims, dst: int | None = None) -> int:
        dst = self.new_slot() if dst is None else dst
        self.plan.steps.append(View(src, dst, self.shape_id(dims)))
        return dst

    def constant_of(self, value: str) -> np.ndarray | None:
        """The array of a value produced by a ``constant`` node, else None."""
        node = self.producers.get(value)
        if node is None or node.op != "constant":
            return None
        return self.module.tensors[node.attr("name")]

    def derived_const(self, owner: str, index: int, array: np.ndarray) -> int:
        s = self.new_slot()
        self.plan.consts.append(Const(s, qlinear=owner, index=index))
        self.const_arrays[s] = array
        return s

    def unsupported(self, node: Node, detail: str = "") -> UnsupportedOpError:
        return UnsupportedOpError.at(node, target=self.target, function=self.fn.name, detail=detail)


def lower_function(module: Module, fn: Function, target: str, anchor_rules: Mapping[str, Callable] | None = None,
                   ) -> tuple[FunctionPlan, dict[str, KernelDef], dict[int, np.ndarray]]:
    """``anchor_rules`` override the built-in rules of some anchor ops (e.g. qlinear on an extern engine)."""
    ctx = LoweringContext(module, fn, target)
    rules = {**ANCHOR_RULES, **(anchor_rules or {})}
    for node in fn.nodes:
        if not is_plan_constant(node) and node.op not in rules and node.op not in FUSED_RULES:
            raise ctx.unsupported(node, "no tvm lowering rule")
    plan = ctx.plan
    for p in fn.params:
        plan.params.append(ctx.slot(p.name))
        plan.param_types.append((list(p.type.shape), p.type.dtype))
    for node in fn.nodes:
        if node.op == "constant":
            plan.consts.append(Const(ctx.slot(node.output.name), tensor=node.attr("name")))
        elif node.op == "scalar":
            plan.consts.append(Const(ctx.slot(node.output.name), scalar=(node.attr("value"), node.output.type.dtype)))
    float_params = [p.type.dtype for p in fn.params if p.type.dtype in ("float32", "float16")]
    plan.act_dtype = float_params[0] if float_params else "float32"

    users = fn.users()
    results = set(fn.results)
    steps = group_nodes(fn, lambda n: n.op in rules, is_plan_constant)
    for step in steps:
        if step.anchor:
            node = step.nodes[0]
            rules[node.op](node, ctx)
        else:
            _lower_group(step, ctx, users, results)
    plan.results = [ctx.slot(r) for r in fn.results]
    plan.check()
    return plan, ctx.kernels, ctx.const_arrays


def _lower_group(step: Step, ctx: LoweringContext, users: Mapping[str, list[Node]], results: set[str]) -> None:
    """One kernel for the group; reshapes at its edges become numpy views (every slot holds a
    C-contiguous array, so a reshape of one is free and keeps the kernel's dims plain)."""
    nodes = list(step.nodes)

    def used_inside(v: str) -> bool:
        return any(v in u.inputs for u in nodes)

    produced = {o.name for n in nodes for o in n.outputs}
    lead = [n for n in nodes if n.op == "reshape" and n.inputs[0] not in produced]
    trail = [n for n in nodes if n.op == "reshape" and n not in lead and not used_inside(n.output.name)]
    for n in lead:
        ctx.view(ctx.slot(n.inputs[0]), n.output.type.shape, ctx.slot(n.output.name))
    body = [n for n in nodes if n not in lead and n not in trail]
    if body:
        _lower_kernel(body, ctx, users, results, {n.inputs[0] for n in trail})
    for n in trail:
        ctx.view(ctx.slot(n.inputs[0]), n.output.type.shape, ctx.slot(n.output.name))


def _lower_kernel(nodes: list[Node], ctx: LoweringContext, users: Mapping[str, list[Node]], results: set[str],
                  extra_outputs: set[str]) -> None:
    produced = {o.name for n in nodes for o in n.outputs}
    members = {id(n) for n in nodes}
    scalars = {o.name for n in ctx.fn.nodes if n.op == "scalar" for o in n.outputs}
    inputs: list[str] = []
    for n in nodes:
        for i in n.inputs:
            if i not in produced and i not in scalars and i not in inputs:
                inputs.append(i)
    outputs = [o.name for n in nodes for o in n.outputs
               if o.name in results or o.name in extra_outputs
               or any(id(u) not in members for u in users.get(o.name, []))]
    in_group_uses: dict[str, int] = {}
    for n in nodes:
        for i in n.inputs:
            in_group_uses[i] = in_group_uses.get(i, 0) + 1

    env = DimEnv([ctx.types[v].shape for v in inputs + outputs])
    rctx = RuleContext(env)
    vals: dict[str, Lazy] = {}
    placeholders = []
    for k, v in enumerate(inputs):
        t = ctx.types[v]
        ph = te.placeholder(env.shape(t.shape), t.dtype, name=f"in{k}")
        placeholders.append(ph)
        vals[v] = from_tensor(ph, t.shape)
    out_tensors: dict[str, te.Tensor] = {}
    for n in nodes:
        xs = [vals[i] if i in vals else _scalar_lazy(i, ctx, rctx) for i in n.inputs]
        y = FUSED_RULES[n.op](n, xs, rctx)
        name = n.output.name
        if name in outputs:
            t, y = materialize(y, f"out{outputs.index(name)}")
            out_tensors[name] = t
        elif in_group_uses.get(name, 0) > 1 and y.literal is None:
            _, y = materialize(y, rctx.name("t"))
        vals[name] = y
    func = te.create_prim_func(placeholders + [out_tensors[o] for o in outputs])
    ops = "_".join(dict.fromkeys(n.op for n in nodes))[:60]
    kdef = KernelDef(f"fused_{ops}", func, "fused")
    ctx.call(kdef, [ctx.slot(v) for v in inputs],
             [ctx.out(ctx.slot(o), ctx.types[o].shape, ctx.types[o].dtype) for o in outputs])


def _scalar_lazy(value: str, ctx: LoweringContext, rctx: RuleContext) -> Lazy:
    node = ctx.producers[value]
    return FUSED_RULES["scalar"](node, [], rctx)
