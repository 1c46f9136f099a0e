"""Capture of Hugging Face causal LMs (Llama / SmolLM2, GPT-2, Qwen2) with torch.export.

The model is exported once with dynamic batch and sequence dims (torch.export specializes
sizes 0 and 1, so the capture uses batch 2 and sequence 8), with ``position_ids`` as an
explicit input and attention routed through bitsmith's causal op. The KV cache is then
added in the IR by the ``kv-cache`` pass (``passes/kv_cache.py``), which the capture asks the
compiler to run first (``CapturedModel.passes``), rather than exported from HF's cache classes.

A decoder whose layers are interchangeable (Llama, Qwen2 without sliding windows; checked by
``layer_stamp.decoder_layers``) is exported with three layers and the rest stamped in the IR
(``layer_stamp``): the same module as exporting every layer, in a fraction of the time.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

from ..ir import Function, Module, TensorTable, verify_module
from .attention import ATTENTION_IMPL
from .captured import CapturedModel, model_name  # noqa: F401  (model_name: re-exported)
from . import layer_stamp
from .export_capture import lower_exported_program, tensor_to_numpy

CAPTURE_BATCH, CAPTURE_SEQ = 2, 8


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False, return_dict=False)[0]


@contextlib.contextmanager
def _bitsmith_attention(model: torch.nn.Module) -> Iterator[None]:
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTENTION_IMPL
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


def _max_positions(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 16)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _export(model: torch.nn.Module, vocab: int) -> torch.export.ExportedProgram:
    ids = torch.arange(CAPTURE_BATCH * CAPTURE_SEQ).reshape(CAPTURE_BATCH, CAPTURE_SEQ) % vocab
    pos = torch.arange(CAPTURE_SEQ).expand(CAPTURE_BATCH, CAPTURE_SEQ)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=_max_positions(model))
    dyn = ({0: batch, 1: seq}, {0: batch, 1: seq})
    with _bitsmith_attention(model), torch.no_grad():
        return torch.export.export(_LogitsOnly(model), (ids, pos), dynamic_shapes=dyn)


def _lower(ep: torch.export.ExportedProgram, unmaterialized: Any) -> tuple[Function, TensorTable]:
    return lower_exported_program(ep, [("batch", "seq"), ("batch", "seq")], ["input_ids", "position_ids"],
                                  module_prefix="m.", unmaterialized=unmaterialized)


def capture_causal_lm(model: torch.nn.Module, tokenizer: Any = None, name: str | None = None,
                      source: Any = None) -> CapturedModel:
    """Exports ``model`` (an HF causal LM in eval mode) to an IR module whose ``passes``
    (``kv-cache``) add its KV cache.

    ``name`` is recorded as the ``model_name`` attribute (default: the config's
    ``_name_or_path`` through ``model_name``). ``source`` (parameter name -> array): the
    model's parameters are placeholders without data, read from it on demand
    (``streamed_capture``)."""
    if model.training:
        model = model.train(False)  # inference mode
    t0 = time.perf_counter()
    vocab = int(model.config.vocab_size)
    unmaterialized = None
    if source is not None:
        from . import streamed_capture as streamed
        unmaterialized = streamed.is_placeholder
    layers = layer_stamp.decoder_layers(model)
    stamped = None
    if layers is not None:  # export three layers, stamp the others (layer_stamp)
        with layer_stamp.truncated(model, layer_stamp.CAPTURED_LAYERS):
            ep = _export(model, vocab)
        t1 = time.perf_counter()
        fn, tensors = _lower(ep, unmaterialized)
        reader = layer_stamp.tensor_reader(model, tensor_to_numpy, unmaterialized)
        stamped = layer_stamp.stamp_layers(fn, tensors, len(layers), reader)
        if stamped is not None:
            fn, tensors = stamped[0], TensorTable(stamped[1], hashed=tensors)
    if stamped is None:
        ep = _export(model, vocab)
        t1 = time.perf_counter()
        fn, tensors = _lower(ep, unmaterialized)
    if source is not None:
        tensors = streamed.provided_table(fn, tensors, source)
    cfg = model.config
    attrs = {  # the kv-cache pass adds the cache layout (num_layers, kv_heads, key/value dims)
        "kind": "causal_lm",
        "architecture": type(model).__name__,
        "vocab_size": vocab,
        "max_positions": _max_positions(model),
        "model_name": model_name(str(getattr(cfg, "_name_or_path", "") or "")) if name is None else name,
    }
    module = verify_module(Module((fn,), tensors, attrs))
    t2 = time.perf_counter()
    tok_json, bos, eos, template = None, None, None, None
    if tokenizer is not None:
        template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
        backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
        tok_json = backend.to_str() if backend is not None else None
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen = getattr(model, "generation_config", None)
    bos = _first_set(bos, getattr(gen, "bos_token_id", None), getattr(cfg, "bos_token_id", None))
    eos = _first_set(eos, getattr(gen, "eos_token_id", None), getattr(cfg, "eos_token_id", None))
    if isinstance(eos, (list, tuple)):  # several EOS ids: the runtime stops on the first only
        eos = eos[0] if eos else None
    return CapturedModel(module, tok_json, bos, eos, template, {"export": t1 - t0, "lower": t2 - t1}, ("kv-cache",))
