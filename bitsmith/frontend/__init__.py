"""Frontend: capture PyTorch / Hugging Face models and lower them into the bitsmith IR.

Imports torch and transformers when it captures (a GGUF model served from the capture cache
imports neither); the runtime never imports this package.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ModelLoadError
from .captured import CapturedModel


def capture(model: Any, example_inputs: tuple | None = None,
            progress: Callable[[str], None] | None = None) -> CapturedModel:
    """A model name, a path (HF dir or .gguf), an HF causal LM, or a plain nn.Module → IR.
    A ``CapturedModel`` (e.g. from ``streamed_capture.capture_streamed``) is taken as it is."""
    say = progress or (lambda message: None)
    if isinstance(model, CapturedModel):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return _capture_named(str(model), say)
    import torch

    from .hf_capture import capture_causal_lm
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


def _capture_named(model: str, say: Callable[[str], None]) -> CapturedModel:
    """A GGUF file that bitsmith's own reader loads is captured once per file and capture code
    (``capture_cache``); anything else is captured every time."""
    import dataclasses
    import time

    from .models import MODEL_ZOO, gguf_path_of, load_gguf, load_pretrained
    gguf_file = gguf_path_of(model)
    name = model if model in MODEL_ZOO else None
    key = None
    if gguf_file is not None:
        from . import capture_cache
        t0 = time.perf_counter()
        from .captured import model_name
        # the name the capture records is part of its bytes: key on it (a renamed file is another entry)
        key = capture_cache.capture_key(gguf_file, name or model_name(model))
        cached = capture_cache.load(key, gguf_file)
        if cached is not None:
            say(f"loaded the capture of {model} from {capture_cache.cache_dir()}")
            return dataclasses.replace(cached, seconds={"cached_capture": time.perf_counter() - t0})
    say(f"loading {model}")
    source, weights = None, None
    if gguf_file is not None:
        hf_model, tokenizer, weights = load_gguf(gguf_file, hf_tokenizer=False)
        if weights is not None:
            from .gguf_loader import blocks_by_parameter
            source = blocks_by_parameter(hf_model, weights)
    else:
        hf_model, tokenizer = load_pretrained(model)
    say("capturing with torch.export and lowering to IR")
    from .hf_capture import capture_causal_lm, model_name
    captured = dataclasses.replace(capture_causal_lm(hf_model, tokenizer, name=name or model_name(model)),
                                   source_weights=source)
    if key is not None and weights is not None:  # our reader: the blocks can be found again by name
        from . import capture_cache
        from .gguf_loader import hf_name
        capture_cache.store(key, captured, {n: hf_name(src.info.name) for n, src in source.sources.items()})
    return captured


def __getattr__(name: str) -> Any:
    if name == "capture_causal_lm":  # imports torch: only when asked for
        from .hf_capture import capture_causal_lm
        return capture_causal_lm
    raise AttributeError(name)


__all__ = ["CapturedModel", "capture", "capture_causal_lm"]
