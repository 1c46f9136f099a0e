"""Pass ``kv-cache``: adds a KV cache to a causal LM's function, inside the IR.

The captured function maps (input_ids, position_ids) to logits, with every attention causal
and bottom-right aligned. Feeding each attention's keys and values through
``concat(past, new)`` along the sequence axis, and returning the concatenations, gives one
function that serves prefill (past length 0) and every decode step: query i then sees all
past keys plus new keys up to itself, which is exactly the full-recompute result.

The function gains parameters ``past_key_i``/``past_value_i`` (sequence dim ``past``) and
results ``present_key_i``/``present_value_i`` after its own; the module records the cache
layout the runtime allocates from (``num_layers``, ``kv_heads``, ``key_dims``, ``value_dims``).

With ``attention_mask`` (the default) the function also gains a last parameter
``attention_mask: i64[batch, past + seq]`` (transformers' convention: 1 = attend, 0 = a
padding key), fed to every attention as its key mask: this is what lets rows of different
lengths share a batch (left-padded prompts, or a decode batch whose rows hold caches of
different lengths). The runtime treats it as optional (all ones when the caller omits it,
see ``runtime/generate.py``), so callers that pass only ids, positions and caches still run.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.errors import PassError
from bitsmith.ir import Function, Module, Node, TensorType, Value
from bitsmith.ir import symbolic as sym
from bitsmith.ir.ops import get_op
from bitsmith.ir.traits import ATTENTION, has_trait

from .base import Pass, register_pass

PAST = "past"
MASK_PARAM = "attention_mask"
SEQ_AXIS = 2  # attention operands are [batch, heads, seq, dim]


@dataclass(frozen=True)
class CacheLayer:
    """One attention layer's cache: kv heads, key and value head dims."""

    heads: int
    key_dim: int
    value_dim: int


def add_kv_cache(fn: Function, attention_mask: bool = True) -> tuple[Function, list[CacheLayer]]:
    """Returns the cached function and, per attention layer in order, its cache layout."""
    nodes: list[Node] = []
    past_params: list[Value] = []
    presents: list[str] = []
    layers: list[CacheLayer] = []
    types = fn.value_types()
    taken = set(types)
    mask: Value | None = None
    if attention_mask and MASK_PARAM in taken:
        raise PassError(f"value name {MASK_PARAM} already used in {fn.name}")
    for node in fn.nodes:
        if not has_trait(node.op, ATTENTION):
            nodes.append(node)
            continue
        i = len(layers)
        if len(node.inputs) != 3:
            raise PassError(f"attention at {node.loc} already has a key mask; the kv-cache pass adds its own")
        q, k, v = node.inputs
        new_inputs = [q]
        for kind, value in (("key", k), ("value", v)):
            t = types[value]
            b, heads, _, dim = t.shape
            past = Value(f"past_{kind}_{i}", TensorType((b, heads, PAST, dim), t.dtype))
            full_name = f"present_{kind}_{i}"
            if past.name in taken or full_name in taken:
                raise PassError(f"value name {past.name} or {full_name} already used in {fn.name} "
                                f"(does it have a KV cache already?)")
            (full_type,) = get_op("concat").infer((past.type, t), {"axis": SEQ_AXIS})
            nodes.append(Node("concat", (past.name, value), (Value(full_name, full_type),),
                              (("axis", SEQ_AXIS),), node.loc))
            past_params.append(past)
            presents.append(full_name)
            new_inputs.append(full_name)
        if attention_mask:
            key_shape = (types[q].shape[0], full_type.shape[SEQ_AXIS])  # [batch, past + seq]
            mask = mask or Value(MASK_PARAM, TensorType(key_shape, "int64"))
            if not all(sym.dims_equal(a, b) for a, b in zip(mask.type.shape, key_shape)):
                raise PassError(f"attention at {node.loc} reads {list(key_shape)} keys, but an earlier "
                                f"attention read {list(mask.type.shape)}: one {MASK_PARAM} cannot serve both")
            new_inputs.append(mask.name)
        nodes.append(node.replace(inputs=tuple(new_inputs)))
        layers.append(CacheLayer(types[k].shape[1], types[k].shape[3], types[v].shape[3]))
    if not layers:
        raise PassError(f"function {fn.name} has no attention layers; a KV cache makes no sense for it")
    mask_params = (mask,) if mask is not None else ()
    cached = fn.replace(params=fn.params + tuple(past_params) + mask_params, nodes=tuple(nodes),
                        results=fn.results + tuple(presents))
    return cached, layers


@register_pass
@dataclass(frozen=True)
class KVCache(Pass):
    """Adds past/present key-value tensors to every attention of ``function`` (see module doc)."""

    name = "kv-cache"
    function: str = "main"
    attention_mask: bool = True

    def apply(self, module: Module) -> Module:
        fn = module.function(self.function)
        cached, layers = add_kv_cache(fn, self.attention_mask)
        functions = tuple(cached if f.name == fn.name else f for f in module.functions)
        attrs = {**dict(module.attrs), "num_layers": len(layers),
                 "kv_heads": tuple(layer.heads for layer in layers),
                 "key_dims": tuple(layer.key_dim for layer in layers),
                 "value_dims": tuple(layer.value_dim for layer in layers)}
        return module.replace(functions=functions, attrs=attrs)
