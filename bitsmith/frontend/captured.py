"""What the frontend hands to the compiler. Kept free of torch so that a capture served from
the on-disk cache (``capture_cache``) never imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ir import Module


@dataclass
class CapturedModel:
    """What the frontend hands to the compiler: IR plus what the runtime needs beside it."""

    module: Module
    tokenizer_json: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # the tokenizer's jinja chat template (transformers reads it from tokenizer_config.json or
    # the GGUF metadata key tokenizer.chat_template); it travels in the artifact
    chat_template: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # pass specs the compiler runs before any other: what makes the module whole (a causal
    # LM's KV cache); the frontend names them and never imports the passes
    passes: tuple[str, ...] = ()
    # a GGUF model's decoded quantized blocks by tensor-table name (bitsmith.gguf.QuantizedRows),
    # for quant="gguf" (pass gguf-quantize); None for other models
    source_weights: Any = None
