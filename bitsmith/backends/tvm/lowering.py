"""IR function -> FunctionPlan + the KernelDefs its steps call.

Fusible ops (``fused_rules.FUSED_RULES``) are grouped by ``fusion.group_nodes`` and each group
becomes one kernel; anchor ops (``anchor_rules.ANCHOR_RULES``) emit their own steps. A group
made only of reshapes of materialised values becomes numpy views. An op with neither rule
raises UnsupportedOpError naming the op, the node's location and the target.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from tvm import te

from ...errors import UnsupportedOpError
from ...ir import Module
from ...ir.graph import Function, Node, Value
from ...ir.traits import LITERAL, has_trait, ops_with
from ...ir.types import TensorType, numpy_dtype
from ..base import LegalOps
from .anchor_rules import ANCHOR_RULES, attrs_reason
from .fused_rules import FUSED_RULES, RuleContext
from .fusion import Step, group_nodes
from .kernel import KernelDef, Recipe
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
        self.scalar_values = {o.name for n in fn.nodes if n.op == "scalar" for o in n.outputs}  # inlined in kernels

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
    inputs: list[str] = []
    for n in nodes:
        for i in n.inputs:
            if i not in produced and i not in ctx.scalar_values and i not in inputs:
                inputs.append(i)
    outputs = [o.name for n in nodes for o in n.outputs
               if o.name in results or o.name in extra_outputs
               or any(id(u) not in members for u in users.get(o.name, []))]
    ops = "_".join(dict.fromkeys(n.op for n in nodes))[:60]
    kdef = KernelDef(f"fused_{ops}", Recipe(fused_func, (group_spec(nodes, inputs, outputs, ctx),)), "fused")
    ctx.call(kdef, [ctx.slot(v) for v in inputs],
             [ctx.out(ctx.slot(o), ctx.types[o].shape, ctx.types[o].dtype) for o in outputs])


def _type_spec(t: TensorType) -> tuple:
    return (tuple(t.shape), t.dtype)


def group_spec(nodes: list[Node], inputs: list[str], outputs: list[str], ctx: LoweringContext) -> tuple:
    """Everything ``fused_func`` builds a fused group's kernel from, as plain literals, with the
    IR's value names replaced by positions (so equal groups of different layers share a key):
    (input types, nodes, outputs). A node is (op, attrs, input refs, output types); a ref is
    ("in", k) for kernel input k, ("val", j, o) for output o of node j of the group, or
    ("scalar", attrs, type) for a scalar node outside the group (its value is inlined)."""
    where: dict[str, tuple] = {v: ("in", k) for k, v in enumerate(inputs)}
    node_specs = []
    for j, n in enumerate(nodes):
        refs = []
        for i in n.inputs:
            if i in where:
                refs.append(where[i])
            else:
                sn = ctx.producers[i]
                refs.append(("scalar", sn.attrs, _type_spec(sn.output.type)))
        node_specs.append((n.op, n.attrs, tuple(refs), tuple(_type_spec(o.type) for o in n.outputs)))
        for o, out in enumerate(n.outputs):
            where[out.name] = ("val", j, o)
    return (tuple(_type_spec(ctx.types[v]) for v in inputs), tuple(node_specs), tuple(where[o] for o in outputs))


def fused_func(spec: tuple) -> Any:
    """The TIR function of a fused group from its ``group_spec`` alone: each node is rebuilt with
    positional value names and lowered by its ``FUSED_RULES`` entry; kernel outputs, and values
    used more than once that are not literals, are materialised."""
    input_types, node_specs, output_refs = spec
    output_of = {ref: k for k, ref in enumerate(output_refs)}
    uses: dict[tuple, int] = {}
    for _, _, refs, _ in node_specs:
        for r in refs:
            uses[r] = uses.get(r, 0) + 1
    env = DimEnv([dims for dims, _ in input_types]
                 + [node_specs[r[1]][3][r[2]][0] for r in output_refs])
    rctx = RuleContext(env)
    vals: dict[tuple, Lazy] = {}
    placeholders = []
    for k, (dims, dtype) in enumerate(input_types):
        ph = te.placeholder(env.shape(dims), dtype, name=f"in{k}")
        placeholders.append(ph)
        vals[("in", k)] = from_tensor(ph, dims)
    out_tensors: dict[int, te.Tensor] = {}
    for j, (op, attrs, refs, out_types) in enumerate(node_specs):
        xs = [vals[r] if r[0] != "scalar" else FUSED_RULES["scalar"](_spec_node("scalar", r[1], (), (r[2],), "s"), [], rctx)
              for r in refs]
        node = _spec_node(op, attrs, tuple(f"r{k}" for k in range(len(refs))), out_types, f"v{j}")
        y = FUSED_RULES[op](node, xs, rctx)
        ref = ("val", j, 0)
        if ref in output_of:
            t, y = materialize(y, f"out{output_of[ref]}")
            out_tensors[output_of[ref]] = t
        elif uses.get(ref, 0) > 1 and y.literal is None:
            _, y = materialize(y, rctx.name("t"))
        vals[ref] = y
    return te.create_prim_func(placeholders + [out_tensors[k] for k in range(len(output_refs))])


def _spec_node(op: str, attrs: tuple, inputs: tuple[str, ...], out_types: tuple, prefix: str) -> Node:
    outs = tuple(Value(f"{prefix}_{o}", TensorType(dims, dtype)) for o, (dims, dtype) in enumerate(out_types))
    return Node(op, inputs, outs, attrs)
