"""Inlining: replace every ``call`` by the callee's nodes, for backends that cannot run calls.

The callee's values get the call's output names where they are results and their own names
elsewhere, or a fresh name where the caller already uses that name; locations are kept. The
callee's symbols are rewritten in the caller's dims (a call may bind ``seq`` to ``1``), in
output types and in the attributes its ops declare as dims (``OpDef.dim_attrs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Function, Module, Node, TensorType, Value
from bitsmith.ir import symbolic as sym
from bitsmith.ir.ops import OPS
from bitsmith.ir.verifier import call_bindings

from .base import Pass, register_pass


def _substitute_attr(value, known: dict[str, sym.Dim]):
    if isinstance(value, tuple):
        return tuple(_substitute_attr(v, known) for v in value)
    if isinstance(value, str):
        return sym.substitute(value, known)
    return value


def _fresh(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _expand_call(call: Node, callee: Function, known: dict[str, sym.Dim], taken: set[str]) -> tuple[list[Node], dict[str, str]]:
    """The callee's nodes renamed into the caller, and aliases for call outputs that name a
    value defined elsewhere (a callee result that is a parameter or repeats another result)."""
    env = {p.name: arg for p, arg in zip(callee.params, call.inputs)}
    param_names = set(env)
    named_by_call: dict[str, str] = {}
    for r, out in zip(callee.results, call.outputs):
        if r not in param_names and r not in named_by_call:
            named_by_call[r] = out.name
    nodes = []
    for node in callee.nodes:
        outputs = []
        for v in node.outputs:
            env[v.name] = named_by_call.get(v.name) or _fresh(v.name, taken)
            shape = tuple(sym.substitute(d, known) for d in v.type.shape)
            outputs.append(Value(env[v.name], TensorType(shape, v.type.dtype)))
        attrs = node.attrs
        dims = OPS[node.op].dim_attrs if node.op in OPS else frozenset()
        if dims:
            attrs = tuple((k, _substitute_attr(v, known) if k in dims else v) for k, v in attrs)
        nodes.append(node.replace(inputs=tuple(env[i] for i in node.inputs), outputs=tuple(outputs), attrs=attrs))
    aliases = {out.name: env[r] for r, out in zip(callee.results, call.outputs) if env[r] != out.name}
    return nodes, aliases


def inline_calls(module: Module, keep_callees: bool = False) -> Module:
    """Every call of every function expanded (callees first); the functions that were called
    are dropped unless ``keep_callees``. The module must verify (no recursion)."""
    called = {n.attr("callee") for f in module.functions for n in f.nodes if n.op == "call"}
    if not called:
        return module  # every tvm/lut compile runs this pass: nothing to rebuild without calls
    done: dict[str, Function] = {}

    def expanded(fn: Function) -> Function:
        if fn.name in done:
            return done[fn.name]
        types = fn.value_types()
        taken = set(types)
        alias: dict[str, str] = {}
        nodes: list[Node] = []
        for node in fn.nodes:
            node = node.replace(inputs=tuple(alias.get(i, i) for i in node.inputs))
            if node.op != "call":
                nodes.append(node)
                continue
            callee, known = call_bindings(node, tuple(types[i] for i in node.inputs), module)
            body, aliases = _expand_call(node, expanded(callee), known, taken)
            nodes += body
            alias.update(aliases)
        done[fn.name] = fn.replace(nodes=tuple(nodes), results=tuple(alias.get(r, r) for r in fn.results))
        return done[fn.name]

    functions = tuple(expanded(f) for f in module.functions if keep_callees or f.name not in called)
    return module.replace(functions=functions)


@register_pass
@dataclass(frozen=True)
class Inline(Pass):
    """Inlines every call; with ``keep_callees`` the called functions stay in the module."""

    name = "inline"
    keep_callees: bool = False

    def apply(self, module: Module) -> Module:
        return inline_calls(module, self.keep_callees)
