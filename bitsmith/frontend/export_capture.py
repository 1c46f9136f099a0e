"""From a torch.export ExportedProgram to an IR function.

Parameters, buffers and lifted constants become ``constant`` nodes (tied weights share one
tensor); user inputs become parameters whose dims are named by the caller; only the nodes
the outputs depend on are lowered, so HF's unused bookkeeping never needs a rule.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import UnsupportedOpError
from ..ir import Function, GraphBuilder, TensorTable, TensorType
from .aten_lowering import ATEN_RULES, LoweringContext, ir_dtype, node_location


def _needed_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    out = next(n for n in graph.nodes if n.op == "output")
    needed: set[torch.fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def lower_exported_program(ep: ExportedProgram, input_dims: Sequence[Sequence[str | None]],
                           input_names: Sequence[str], name: str = "main",
                           module_prefix: str = "", unmaterialized: Callable[[torch.Tensor], bool] | None = None,
                           ) -> tuple[Function, TensorTable]:
    """Lowers ``ep``; ``input_dims[i][j]`` names the symbol of dim j of user input i (None: static).

    Tensors for which ``unmaterialized`` is true become constants without data: the returned
    table lacks them, and the caller supplies them (``streamed_capture``: weights read on demand)."""
    graph = ep.graph
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    user_inputs = [n for n in placeholders if specs[n.name].kind == InputKind.USER_INPUT]
    if len(user_inputs) != len(input_names):
        raise ValueError(f"exported program has {len(user_inputs)} inputs, names given for {len(input_names)}")

    symbols = {}
    for node, dims in zip(user_inputs, input_dims):
        for d, dim_name in zip(node.meta["val"].shape, dims):
            if dim_name is not None and isinstance(d, torch.SymInt):
                symbols[d.node.expr] = dim_name

    b = GraphBuilder(name)
    ctx = LoweringContext(b, symbols, module_prefix)
    by_storage: dict[tuple, str] = {}
    needed = _needed_nodes(graph)
    for node, pname in zip(user_inputs, input_names):
        ctx.env[node] = b.param(pname, ctx.meta_type(node))

    for node in graph.nodes:
        if node not in needed or node.op == "output" or node in ctx.env:
            continue
        ctx.node = node
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == InputKind.PARAMETER or spec.kind == InputKind.BUFFER:
                tensor = ep.state_dict.get(spec.target)
                if tensor is None:
                    tensor = ep.constants[spec.target]
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                tensor = ep.constants[spec.target]
            else:
                raise UnsupportedOpError(f"input kind {spec.kind.name}", detail=f"placeholder {node.name}")
            tname = spec.target[len(module_prefix):] if spec.target.startswith(module_prefix) else spec.target
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tuple(tensor.stride()), tensor.dtype)
            tname = by_storage.setdefault(key, tname)  # tied weights: one tensor, first name wins
            ir_dtype(tensor.dtype, f"for tensor {tname}")
            if unmaterialized is not None and unmaterialized(tensor):
                ctx.env[node] = b.declare_constant(tname, TensorType(tuple(tensor.shape), ir_dtype(tensor.dtype)),
                                                   node_location(node, module_prefix))
                continue
            data = b.tensors.get(tname)
            ctx.env[node] = b.constant(tname, data if data is not None else tensor_to_numpy(tensor),
                                       node_location(node, module_prefix))
            continue
        if node.op != "call_function":
            raise ctx.unsupported(f"fx node kind {node.op}")
        rule = ATEN_RULES.get(node.target)
        if rule is None:
            raise ctx.unsupported("no lowering rule")
        result = rule(ctx, node)
        if isinstance(result, str) and hasattr(node.meta.get("val"), "shape"):
            ctx.check(node, result)
        ctx.env[node] = result

    out = next(n for n in graph.nodes if n.op == "output")
    results = []
    for r in out.args[0]:
        v = ctx.env[r]
        if not isinstance(v, str):
            raise UnsupportedOpError("output", detail=f"model output {r} is not a tensor")
        results.append(v)
    fn = b.function(results)
    return fn, TensorTable(b.tensors)
