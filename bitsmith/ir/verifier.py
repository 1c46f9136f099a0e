"""Module verifier: SSA form, operand types, each op's own constraints, constants vs table."""

from __future__ import annotations

from .graph import Function, Module, Node
from .ops import get_op
from .types import IRTypeError, TensorType


class VerificationError(ValueError):
    """The module is not well formed; the message names the function, node and reason."""


def _where(fn: Function, node: Node) -> str:
    outs = ", ".join(o.name for o in node.outputs)
    loc = f" ({node.loc})" if node.loc else ""
    return f"function {fn.name!r}, node %{outs} = {node.op}{loc}"


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
        try:
            inferred = verify_node_types(node, tuple(defined[i] for i in node.inputs))
        except (IRTypeError, LookupError, TypeError, ValueError) as e:
            raise VerificationError(f"{where}: {e}") from e
        if inferred is None:
            if node.op == "constant" and module is not None:
                name = node.attr("name")
                if name not in module.tensors:
                    raise VerificationError(f"{where}: tensor {name!r} is not in the tensor table")
                info = module.tensors.info(name)
                declared = node.outputs[0].type if len(node.outputs) == 1 else None
                if declared != TensorType(info.shape, info.dtype):
                    raise VerificationError(
                        f"{where}: declared type {declared} but the table holds {info.dtype}{list(info.shape)}")
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
    for fn in module.functions:
        verify_function(fn, module)
    return module
