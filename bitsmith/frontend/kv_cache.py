"""Adds a KV cache to a captured causal LM, inside the IR.

The captured function maps (input_ids, position_ids) to logits, with every attention causal
and bottom-right aligned. Feeding each attention's keys and values through
``concat(past, new)`` along the sequence axis, and returning the concatenations, gives one
function that serves prefill (past length 0) and every decode step: query i then sees all
past keys plus new keys up to itself, which is exactly the full-recompute result.
"""

from __future__ import annotations

from ..ir import Function, Node, TensorType, Value
from ..ir.ops import get_op

PAST = "past"


def add_kv_cache(fn: Function) -> tuple[Function, list[dict]]:
    """Returns the cached function and, per attention layer, its cache layout."""
    nodes: list[Node] = []
    past_params: list[Value] = []
    presents: list[str] = []
    layers: list[dict] = []
    types = fn.value_types()
    taken = set(types)
    for node in fn.nodes:
        if node.op != "attention":
            nodes.append(node)
            continue
        i = len(layers)
        q, k, v = node.inputs
        new_inputs = [q]
        for kind, value in (("key", k), ("value", v)):
            t = types[value]
            b, heads, _, dim = t.shape
            past = Value(f"past_{kind}_{i}", TensorType((b, heads, PAST, dim), t.dtype))
            full_name = f"present_{kind}_{i}"
            if past.name in taken or full_name in taken:
                raise ValueError(f"value name {past.name} or {full_name} already used in {fn.name}")
            (full_type,) = get_op("concat").infer((past.type, t), {"axis": 2})
            nodes.append(Node("concat", (past.name, value), (Value(full_name, full_type),),
                              (("axis", 2),), node.loc))
            past_params.append(past)
            presents.append(full_name)
            new_inputs.append(full_name)
        nodes.append(node.replace(inputs=tuple(new_inputs)))
        layers.append({"heads": types[k].shape[1], "key_dim": types[k].shape[3],
                       "value_dim": types[v].shape[3], "module": node.loc.module_path if node.loc else ""})
    if not layers:
        raise ValueError("model has no attention layers; a KV cache makes no sense for it")
    cached = fn.replace(params=fn.params + tuple(past_params), nodes=tuple(nodes),
                        results=fn.results + tuple(presents))
    return cached, layers
