"""A bitsmith ``Module`` as an MLIR module: text written here, parsed and verified by MLIR.

Each function becomes a ``func.func`` (parameters named by ``bitsmith.name`` argument
attributes, symbolic dims kept in ``bitsmith.shape``; function attributes as
``bitsmith.<key>``), each node a run of ops whose last one is tagged (``tags.py``), module
attributes a ``bitsmith.module`` dictionary. The returned text is MLIR's own printing of
the parsed module, so it is exactly what MLIR reads back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Function, Module, Node
from ..ir.traits import CALL, has_trait
from . import bindings
from .constants import declare_external, emit_constant, is_inline, symbol
from .dialect_ops import emit_call, emit_dialect_op
from .emitter import FunctionEmitter
from .options import ExportOptions
from .registry import EMITTERS, standard_ops
from .structured import attention_linalg
from .tags import (ATTRS, LOC, MODULE_ATTRS, NAME, OP, OPERANDS, SHA256, SHAPE, encode, encode_dict,
                   encode_location, run_operands)
from .types import has_symbolic_dims, tensor_type


@dataclass(frozen=True)
class _FunctionPlan:
    fn: Function
    tags: tuple[tuple[int, Node], ...]
    kinds: tuple[str, ...]  # per tag: "standard" (carries bitsmith.op), "dialect" (a bitsmith.<op>) or "call"
    top_ops: int


def _emit_node(em: FunctionEmitter, module: Module, node: Node, externals: dict) -> tuple[str, str]:
    """Emits ``node``; returns its defining SSA value and how it is tagged (see ``_FunctionPlan``)."""
    if node.op == "constant":
        info = module.tensors.info(node.attr("name"))
        inline = is_inline(info, em.options.inline_weights, em.options.inline_max_elements)
        if not inline:
            externals[info.name] = info
        return emit_constant(em, node, info, module.tensors[info.name] if inline else None), "standard"
    if has_trait(node.op, CALL):
        return emit_call(em, node), "call"
    if node.op == "attention" and em.options.attention == "linalg":
        return attention_linalg(em, node), "standard"
    if node.op in EMITTERS:
        return EMITTERS[node.op](em, node), "standard"
    return emit_dialect_op(em, node), "dialect"


def _function_text(module: Module, fn: Function, options: ExportOptions,
                   externals: dict) -> tuple[list[str], _FunctionPlan]:
    args = {p.name: f"%a{i}" for i, p in enumerate(fn.params)}
    em = FunctionEmitter(fn, args, options)
    kinds = []
    for node in fn.nodes:
        ssa, kind = _emit_node(em, module, node, externals)
        kinds.append(kind)
        em.tag(node, ssa, len(node.outputs))
    params = ", ".join(f"{args[p.name]}: {tensor_type(p.type)}" for p in fn.params)
    result_types = [tensor_type(t) for t in fn.result_types()]
    results = ", ".join(em.ssa(r) for r in fn.results)
    lines = [f"func.func {symbol(fn.name)}({params}) -> ({', '.join(result_types)}) {{"]
    lines += [f"  {line}" for text in em.lines for line in text.split("\n")]
    lines.append(f"  func.return {results} : {', '.join(result_types)}" if fn.results else "  func.return")
    lines.append("}")
    return lines, _FunctionPlan(fn, tuple(em.tags), tuple(kinds), em.top_ops)


def module_text(module: Module, options: ExportOptions) -> tuple[str, list[_FunctionPlan], dict]:
    """The unparsed MLIR text and what ``attach_tags`` needs to mark it."""
    standard_ops()  # loads the emitter modules
    externals: dict = {}
    body: list[str] = []
    plans = []
    for fn in module.functions:
        lines, plan = _function_text(module, fn, options, externals)
        body += lines
        plans.append(plan)
    globals_ = [declare_external(externals[name]) for name in sorted(externals)]
    return "\n".join(["module {"] + globals_ + body + ["}"]) + "\n", plans, externals


def _tag_node(op, node: Node, kind: str) -> None:
    ir = bindings.ir()
    names = [o.name for o in node.outputs]
    op.attributes[NAME] = encode(names[0] if len(names) == 1 else tuple(names))
    if kind == "standard":
        op.attributes[OP] = ir.StringAttr.get(node.op)
        if node.attrs:
            op.attributes[ATTRS] = encode_dict(node.attrs)
    elif kind == "dialect":
        for key, value in node.attrs:
            op.attributes[key] = encode(value)
    else:  # a call's result dims are the caller's symbols, which the callee's types do not name
        if any(has_symbolic_dims(o.type) for o in node.outputs):
            op.attributes[SHAPE] = encode(tuple(tuple(o.type.shape) for o in node.outputs))
    if node.loc is not None:
        op.attributes[LOC] = encode_location(node.loc)


def attach_tags(mlir_module, module: Module, plans: list[_FunctionPlan], externals: dict) -> None:
    """Marks the parsed ops with the nodes they define (see ``tags.py``)."""
    ir = bindings.ir()
    if module.attrs:
        mlir_module.operation.attributes[MODULE_ATTRS] = encode_dict(module.attrs)
    ops = list(mlir_module.body.operations)
    globals_, funcs = ops[:len(externals)], ops[len(externals):]
    for g, name in zip(globals_, sorted(externals)):
        g.attributes[SHA256] = ir.StringAttr.get(externals[name].sha256)
    for func, plan in zip(funcs, plans):
        arg_attrs = []
        for p in plan.fn.params:
            entry = {NAME: encode(p.name)}
            if has_symbolic_dims(p.type):
                entry[SHAPE] = encode(tuple(p.type.shape))
            arg_attrs.append(ir.DictAttr.get(entry))
        func.attributes["arg_attrs"] = ir.ArrayAttr.get(arg_attrs)
        for key, value in getattr(plan.fn, "attrs", ()):
            func.attributes[f"bitsmith.{key}"] = encode(value)
        block = func.regions[0].blocks[0]
        top = list(block.operations)
        if len(top) != plan.top_ops + 1:
            raise bindings.MLIRInteropError(f"@{plan.fn.name}: emitted {plan.top_ops} ops, MLIR parsed {len(top) - 1}")
        env = {arg: p.name for arg, p in zip(block.arguments, plan.fn.params)}
        start = 0
        for i, (index, node) in enumerate(plan.tags):
            op = top[index]
            _tag_node(op, node, plan.kinds[i])
            names = [env[v] for v in run_operands(top[start:index + 1], lambda v: v in env)]
            try:
                positions = tuple(names.index(v) for v in node.inputs)
            except ValueError:
                raise bindings.MLIRInteropError(
                    f"@{plan.fn.name}: the ops written for {node.op} (%{node.outputs[0].name}) do not read all "
                    f"of its inputs {list(node.inputs)} (they read {names})") from None
            if positions != tuple(range(len(names))):
                op.attributes[OPERANDS] = encode(positions)
            for result, out in zip(op.results, node.outputs):
                env[result] = out.name
            start = index + 1


def export_module(module: Module, options: ExportOptions | None = None) -> str:
    """MLIR text for ``module``, parsed and verified by MLIR (``MLIRInteropError`` if not)."""
    options = options or ExportOptions()
    text, plans, externals = module_text(module, options)
    ir = bindings.ir()
    with bindings.new_context(), ir.Location.unknown():
        try:
            parsed = ir.Module.parse(text)
        except ir.MLIRError as e:
            raise bindings.MLIRInteropError(f"MLIR rejected the exported text: {e}") from e
        attach_tags(parsed, module, plans, externals)
        try:
            parsed.operation.verify()
        except ir.MLIRError as e:
            raise bindings.MLIRInteropError(f"MLIR's verifier rejected the exported module: {e}") from e
        return str(parsed)
