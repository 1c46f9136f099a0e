"""Frontend: capture PyTorch / Hugging Face models and lower them into the bitsmith IR.

Imports torch and transformers; the runtime never imports this package.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ModelLoadError
from .hf_capture import CapturedModel, capture_causal_lm


def capture(model: Any, example_inputs: tuple | None = None,
            progress: Callable[[str], None] | None = None) -> CapturedModel:
    """A model name, a path (HF dir or .gguf), an HF causal LM, or a plain nn.Module → IR."""
    import torch

    say = progress or (lambda message: None)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        import dataclasses
        from .hf_capture import model_name
        from .models import MODEL_ZOO, gguf_path_of, load_gguf, load_pretrained
        say(f"loading {model}")
        gguf_file = gguf_path_of(str(model))
        source = None
        if gguf_file is not None:
            hf_model, tokenizer, weights = load_gguf(gguf_file)
            if weights is not None:
                from .gguf_loader import blocks_by_parameter
                source = blocks_by_parameter(hf_model, weights)
        else:
            hf_model, tokenizer = load_pretrained(str(model))
        say("capturing with torch.export and lowering to IR")
        name = str(model) if str(model) in MODEL_ZOO else model_name(str(model))
        return dataclasses.replace(capture_causal_lm(hf_model, tokenizer, name=name), source_weights=source)
    if not isinstance(model, torch.nn.Module):
        raise ModelLoadError(f"cannot compile a {type(model).__name__}: pass an nn.Module, a model name or a path")
    if _is_hf_causal_lm(model) and example_inputs is None:
        say("capturing with torch.export and lowering to IR")
        return capture_causal_lm(model)
    if example_inputs is None:
        raise ModelLoadError("a plain nn.Module needs example_inputs=(tensor, ...) to be traced")
    from .fx_capture import capture_module
    say("tracing with torch.fx and lowering to IR")
    return capture_module(model, tuple(example_inputs))


def _is_hf_causal_lm(model: Any) -> bool:
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin)


__all__ = ["CapturedModel", "capture", "capture_causal_lm"]
