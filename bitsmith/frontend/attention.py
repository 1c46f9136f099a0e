"""A capture-friendly attention for Hugging Face models.

transformers looks attention up by name (``config._attn_implementation``). We register
``"bitsmith"``, which calls one custom torch op, so ``torch.export`` keeps each attention as a
single node (q, k, v, scale) instead of HF's mask-building code. Because "bitsmith" has no
mask function registered, transformers passes no mask; the op is causal and aligned to the
bottom right, which is what lets the frontend add a KV cache inside the IR later.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

ATTENTION_IMPL = "bitsmith"


@torch.library.custom_op("bitsmith::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, hq, s, d], k/v [b, hkv, t, d]; query head h reads kv head h // (hq // hkv)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    s, t = q.shape[2], k.shape[2]
    mask = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@causal_attention.register_fake
def _causal_attention_fake(q, k, v, scale):
    return q.new_empty(q.shape[:3] + (v.shape[3],))


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if attention_mask is not None:
        raise ValueError("bitsmith attention supports causal attention without padding masks")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("bitsmith attention does not support softcap or sliding-window attention")
    scale = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
    out = causal_attention(query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_IMPL, _hf_attention)
