"""Module verifier: SSA form, operand types, each op's own constraints, constants vs table."""

from __future__ import annotations

from . import symbolic as sym
from .graph import Function, Module, Node
from .ops import OPS, get_op
from .types import IRTypeError, TensorType


class VerificationError(ValueError):
    """The module is not well formed; the message names the function, node and reason."""


def _where(fn: Function, node: Node) -> str:
    outs = ", ".join("%" + o.name for o in node.outputs)
    loc = f" ({node.loc})" if node.loc else ""
    return f"function {fn.name!r}, node {outs} = {node.op}{loc}"


def verify_node_types(node: Node, in_types: tuple[TensorType, ...]) -> tuple[TensorType, ...] | None:
    """Checks arity and attributes and returns the inferred output types (None: declared)."""
    opdef = get_op(node.op)
    if not opdef.min_inputs <= len(node.inputs) <= opdef.max_inputs:
        raise IRTypeError(f"{node.op} takes {opdef.min_inputs}..{opdef.max_inputs} inputs, got {len(node.inputs)}")
    keys = {k for k, _ in node.attrs}
    missing = opdef.required_attrs - keys
    unknown = keys - opdef.required_attrs - opdef.optional_attrs
    if missing:
        raise IRTypeError(f"{node.op} misses attributes {sorted(missing)}")
    if unknown:
        raise IRTypeError(f"{node.op} has unknown attributes {sorted(unknown)}")
    if opdef.infer is None:
        return None
    return tuple(opdef.infer(in_types, node.attr_dict))


def function_symbols(fn: Function) -> set[str]:
    """Every symbol a function's types and dim attributes mention."""
    out: set[str] = set()
    for t in fn.value_types().values():
        for d in t.shape:
            out |= sym.symbols(d)
    for node in fn.nodes:
        for key in get_op(node.op).dim_attrs if node.op in OPS else ():
            value = node.attr(key)
            for d in value if isinstance(value, tuple) else (value,):
                if isinstance(d, (int, str)) and not isinstance(d, bool):
                    out |= sym.symbols(d)
    return out


def call_bindings(node: Node, in_types: tuple[TensorType, ...], module: Module) -> tuple[Function, dict[str, sym.Dim]]:
    """The callee of a ``call`` and its symbols written in the caller's dims; raises
    IRTypeError if the callee is missing or the arguments do not fit its parameters.

    The arguments' dims bind the callee's symbols (``symbolic.bind``: a parameter ``f32[seq,4]``
    takes ``f32[1,4]`` or ``f32[past+seq,4]``); a symbol they leave unbound means the caller's
    symbol of the same name (so ``f32[batch*seq,4]`` passes through unchanged).
    """
    name = node.attr("callee")
    if not isinstance(name, str) or name not in {f.name for f in module.functions}:
        raise IRTypeError(f"callee {name!r} is not a function of the module "
                          f"(it has {[f.name for f in module.functions]})")
    callee = module.function(name)
    if len(in_types) != len(callee.params):
        raise IRTypeError(f"@{name} takes {len(callee.params)} arguments "
                          f"({', '.join('%' + p.name for p in callee.params)}), the call passes {len(in_types)}")
    for i, (p, t) in enumerate(zip(callee.params, in_types)):
        if p.type.dtype != t.dtype or p.type.rank != t.rank:
            raise IRTypeError(f"argument {i} is {t} but @{name}'s parameter %{p.name} is {p.type}")
    same_name = {s: s for s in function_symbols(callee)}
    try:
        known = sym.bind(((d, a) for p, t in zip(callee.params, in_types) for d, a in zip(p.type.shape, t.shape)),
                         same_name)
    except sym.SymbolicDimError as e:
        raise IRTypeError(f"arguments ({', '.join(map(str, in_types))}) do not fit @{name}'s parameters: {e}") from None
    return callee, {**same_name, **known}


def call_result_types(node: Node, in_types: tuple[TensorType, ...], module: Module) -> tuple[TensorType, ...]:
    """The result types of a ``call`` with these argument types, in the caller's dims."""
    callee, known = call_bindings(node, in_types, module)
    types = callee.value_types()
    out = []
    for r in callee.results:
        if r not in types:
            raise IRTypeError(f"@{callee.name}'s result %{r} is not defined")
        t = types[r]
        out.append(TensorType(tuple(sym.substitute(d, known) for d in t.shape), t.dtype))
    if not out:
        raise IRTypeError(f"@{callee.name} returns nothing; a call needs at least one result")
    return tuple(out)


def verify_function(fn: Function, module: Module | None = None) -> None:
    defined: dict[str, TensorType] = {}
    for p in fn.params:
        if p.name in defined:
            raise VerificationError(f"function {fn.name!r}: parameter %{p.name} defined twice")
        defined[p.name] = p.type
    for node in fn.nodes:
        where = _where(fn, node)
        for i in node.inputs:
            if i not in defined:
                raise VerificationError(f"{where}: operand %{i} is not defined before use")
        if node.op == "call" and module is None:
            raise VerificationError(f"{where}: a call is checked against its callee; verify the whole module")
        try:
            in_types = tuple(defined[i] for i in node.inputs)
            inferred = verify_node_types(node, in_types)
            if node.op == "call":
                inferred = call_result_types(node, in_types, module)
                if len(inferred) != len(node.outputs):
                    raise IRTypeError(f"the call has {len(node.outputs)} outputs but @{node.attr('callee')} "
                                      f"returns {len(inferred)} results")
        except (IRTypeError, LookupError, TypeError, ValueError) as e:
            raise VerificationError(f"{where}: {e}") from e
        if inferred is None:
            if node.op == "constant" and module is not None:
                name = node.attr("name")
                if name not in module.tensors:
                    raise VerificationError(f"{where}: tensor {name!r} is not in the tensor table")
                held = module.tensors.tensor_type(name)
                declared = node.outputs[0].type if len(node.outputs) == 1 else None
                if declared != held:
                    raise VerificationError(
                        f"{where}: declared type {declared} but the table holds {held.dtype}{list(held.shape)}")
        elif tuple(o.type for o in node.outputs) != inferred:
            got = ", ".join(str(o.type) for o in node.outputs)
            want = ", ".join(str(t) for t in inferred)
            raise VerificationError(f"{where}: declared type {got} but the op infers {want}")
        for o in node.outputs:
            if o.name in defined:
                raise VerificationError(f"{where}: value %{o.name} defined twice (not SSA)")
            defined[o.name] = o.type
    for r in fn.results:
        if r not in defined:
            raise VerificationError(f"function {fn.name!r}: result %{r} is not defined")


def verify_module(module: Module) -> Module:
    """Raises VerificationError on the first problem; returns the module for chaining."""
    names = [f.name for f in module.functions]
    if len(set(names)) != len(names):
        raise VerificationError(f"duplicate function names in {names}")
    for fn in _callees_first(module):  # so an error in a callee is reported there, not at its calls
        verify_function(fn, module)
    _refuse_recursion(module)
    return module


def _callees_first(module: Module) -> list[Function]:
    by_name = {f.name: f for f in module.functions}
    order: list[Function] = []
    seen: set[str] = set()

    def visit(fn: Function) -> None:
        seen.add(fn.name)
        for node in fn.nodes:
            callee = node.attr("callee") if node.op == "call" else None
            if isinstance(callee, str) and callee in by_name and callee not in seen:
                visit(by_name[callee])
        order.append(fn)

    for fn in module.functions:
        if fn.name not in seen:
            visit(fn)
    return order


def _refuse_recursion(module: Module) -> None:
    """Calls may not recurse, directly or through other functions: the interpreter and every
    backend expand calls without a stack of frames."""
    calls = {f.name: [n for n in f.nodes if n.op == "call"] for f in module.functions}
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for node in calls[name]:
            callee = node.attr("callee")
            if state.get(callee) == "open":
                cycle = " -> ".join(path[path.index(callee):] + [name, callee]) if callee != name else f"{name} -> {name}"
                raise VerificationError(f"{_where(module.function(name), node)}: recursion ({cycle}) is not allowed")
            if callee not in state:
                visit(callee, path + [name])
        state[name] = "done"

    for fn in module.functions:
        if fn.name not in state:
            visit(fn.name, [])
