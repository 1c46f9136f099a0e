"""Pass ``length_adaptive``: plans length-bucketed specialisation (FlightLLM, Zeng et al. FPGA
2024, "length adaptive compilation").

A kv-cache function (parameters with the symbolic ``past`` dim) gets the function attribute
``length_buckets = (prefill_step, kv_step, max_length)``: a backend that specialises on lengths
compiles one program per bucket (``bitsmith.ir.length_buckets``) and runs a call in the
program of its bucket, its inputs padded: prefill tokens at the end (causal attention keeps
real rows from seeing padded ones; padded rows are dropped), decode cache rows between the
real ones and the new token (masked out of attention by the runtime's valid length), so
results are unchanged. The IR is not duplicated per bucket: the plan is data, the programs
are the backend's. ``max_length=0`` means min(2048, the module's ``max_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Module
from bitsmith.ir import symbolic as sym
from bitsmith.ir.length_buckets import BUCKETS_ATTR, LengthBuckets

from .base import Pass, register_pass


def has_cache(fn) -> bool:
    return any("past" in sym.symbols(d) for p in fn.params for d in p.type.shape)


@register_pass
@dataclass(frozen=True)
class LengthAdaptive(Pass):
    name = "length_adaptive"
    idempotent = True
    prefill_step: int = 128
    kv_step: int = 16
    max_length: int = 0

    def apply(self, module: Module) -> Module:
        max_len = self.max_length or min(2048, int(module.attr("max_positions", 2048) or 2048))
        plan = LengthBuckets(self.prefill_step, self.kv_step, max_len).to_attr()
        fns = tuple(fn.replace(attrs={**dict(fn.attrs), BUCKETS_ATTR: plan}) if has_cache(fn) else fn
                    for fn in module.functions)
        return module.replace(functions=fns)
