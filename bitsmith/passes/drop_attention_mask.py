"""Pass ``drop-attention-mask``: takes ``main``'s key-padding mask away again, for a target whose
attention lowering has no mask input (the fpga targets mask their own bucket padding).

The result is the function the ``kv-cache`` pass builds with ``attention_mask=false``: the
runtime then feeds equal-length batches only and refuses a ragged one with a clear error
(``RaggedBatchError``), so dropping the mask never gives a silently wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.errors import PassError
from bitsmith.ir import Module
from bitsmith.ir.traits import ATTENTION, has_trait

from .base import Pass, register_pass
from .kv_cache import MASK_PARAM


@register_pass
@dataclass(frozen=True)
class DropAttentionMask(Pass):
    """Removes ``attention_mask`` from ``function``'s params and from the attentions reading it."""

    name = "drop-attention-mask"
    idempotent = True
    function: str = "main"

    def apply(self, module: Module) -> Module:
        if self.function not in {f.name for f in module.functions}:
            return module
        fn = module.function(self.function)
        if not any(p.name == MASK_PARAM for p in fn.params):
            return module
        nodes = []
        for node in fn.nodes:
            if MASK_PARAM not in node.inputs:
                nodes.append(node)
                continue
            if not has_trait(node.op, ATTENTION) or node.inputs.index(MASK_PARAM) != 3:
                raise PassError(f"{node.op} at {node.loc} reads {MASK_PARAM} other than as an attention's "
                                f"key mask; this target cannot drop it")
            nodes.append(node.replace(inputs=node.inputs[:3]))
        if MASK_PARAM in fn.results:
            raise PassError(f"{self.function} returns {MASK_PARAM}; this target cannot drop it")
        dropped = fn.replace(params=tuple(p for p in fn.params if p.name != MASK_PARAM), nodes=tuple(nodes))
        return module.replace(functions=tuple(dropped if f is fn else f for f in module.functions))
