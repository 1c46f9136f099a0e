"""What the frontend hands to the compiler. Kept free of torch so that a capture served from
the on-disk cache (``capture_cache``) never imports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


def model_name(name_or_path: str) -> str:
    """How an artifact names the model it came from: a zoo or hub name as given, a local path
    by its base name. Never an absolute path: artifacts must not depend on where the model
    (or the machine's packages) lie, so that compiling the same model twice gives the same bytes."""
    text = str(name_or_path).rstrip("/\\")
    if not text:
        return ""
    path = Path(text)
    if path.is_absolute() or text.startswith(".") or path.exists():
        return path.resolve().name  # resolved so that "." and "x/.." name a directory
    return text
