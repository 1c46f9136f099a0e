"""Pass ``kv_head_group``: retypes each offloaded attention function to one KV-head group.

Attention is independent per KV head: query heads ``h*g .. h*g+g-1`` (g = q heads / kv heads)
read only kv head h. An attention worker holding m of the kv heads therefore runs the program
for one group (g query heads, 1 kv head) with its heads folded into the batch axis:
``q[b, m*g, s, d]`` viewed as ``[b*m, g, s, d]`` and ``k[b, m, t, d]`` as ``[b*m, 1, t, d]``, both
plain reshapes. One compiled program so serves any split of the heads chosen at run time
(SmolLM2's 3 kv heads as 3, 2 + 1 or 1 + 1 + 1) on targets whose kernels need fixed head counts.

Applies to functions ``offload_attention`` made (``param_roles``): ``q`` parameters get g heads,
``kv`` and ``state`` parameters 1; the other parameters keep their types (their batch axis is
repeated per folded head by the runtime); every node is re-typed by its op's shape inference.
The function records ``q_heads``/``kv_heads``, its original head counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.errors import PassError
from bitsmith.ir import Function, Module, TensorType, Value
from bitsmith.ir.ops import get_op

from .base import Pass, register_pass
from .offload_attention import ATTENTION_DEVICE, LABEL

HEAD_AXIS = 1  # attention operands are [batch, heads, seq, dim]


def _heads(fn: Function, roles: tuple[str, ...], kind: tuple[str, ...]) -> int:
    counts = {p.type.shape[HEAD_AXIS] for p, r in zip(fn.params, roles) if r in kind}
    if len(counts) != 1 or not isinstance(next(iter(counts)), int):
        raise PassError(f"kv_head_group: {fn.name}'s {'/'.join(kind)} parameters have head counts {sorted(map(str, counts))}; "
                        "need one fixed count")
    return next(iter(counts))


def _with_heads(t: TensorType, heads: int) -> TensorType:
    return TensorType(t.shape[:HEAD_AXIS] + (heads,) + t.shape[HEAD_AXIS + 1:], t.dtype)


def group_function(fn: Function) -> Function:
    """``fn`` computing one KV-head group (see the module docstring)."""
    roles = tuple(fn.attr("param_roles"))
    kv = _heads(fn, roles, ("kv", "state"))
    q = _heads(fn, roles, ("q",))
    if q % kv:
        raise PassError(f"kv_head_group: {fn.name} has {q} query heads, not a multiple of its {kv} kv heads")
    width = {"q": q // kv, "kv": 1, "state": 1}
    params = tuple(Value(p.name, _with_heads(p.type, width[r])) if r in width else p for p, r in zip(fn.params, roles))
    types = {p.name: p.type for p in params}
    nodes = []
    for node in fn.nodes:
        out = get_op(node.op).infer(tuple(types[i] for i in node.inputs), node.attr_dict)
        outputs = tuple(Value(o.name, t) for o, t in zip(node.outputs, out))
        types.update({o.name: o.type for o in outputs})
        nodes.append(node.replace(outputs=outputs))
    return fn.replace(params=params, nodes=tuple(nodes), attrs={**dict(fn.attrs), "q_heads": q, "kv_heads": kv})


@register_pass
@dataclass(frozen=True)
class KVHeadGroup(Pass):
    """Retypes every offloaded attention function to one KV-head group (see the module docstring)."""

    name = "kv_head_group"
    idempotent = True

    def apply(self, module: Module) -> Module:
        functions = tuple(group_function(f) if f.attr("partition") == LABEL and f.attr("device") == ATTENTION_DEVICE
                          and f.attr("kv_heads") is None else f for f in module.functions)
        return module.replace(functions=functions)
