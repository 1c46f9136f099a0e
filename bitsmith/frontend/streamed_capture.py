"""Capture of a Hugging Face causal LM whose weights are never all in memory.

``capture_streamed(config, source)`` builds the model from its config with parameters that
own no memory (each a zero-stride view of one scalar; buffers such as rotary ``inv_freq``
stay real, they are small and computed at construction), exports and lowers it like
``capture_causal_lm``, and puts the parameters in a ``ProvidedTensorTable`` that reads each
one from ``source`` (Hugging Face parameter name -> float array) only when a pass or the
backend asks for it. The quantize pass then packs one linear at a time and drops its fp32
weight, so a 7B model (27 GB in fp32) compiles in a few GB (docs/tvm-backend.md,
"Streamed large-model compiles").
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..ir import Function, TensorTable
from ..ir.provided_tensors import ProvidedTensorTable, TensorSource
from .captured import CapturedModel


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every registered parameter is moved to the meta device (its CPU
    allocation is freed at once; initializers then run on meta, touching nothing)."""
    register = torch.nn.Module.register_parameter

    def on_meta(self: torch.nn.Module, name: str, param: Any) -> None:
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=False)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def is_placeholder(t: torch.Tensor) -> bool:
    """A parameter ``empty_causal_lm`` made: more than one element, all at one address."""
    return t.numel() > 1 and all(s == 0 for s in t.stride())


def provided_table(fn: Function, held: TensorTable, source: TensorSource) -> ProvidedTensorTable:
    """``held`` plus every constant of ``fn`` it lacks, read from ``source`` on demand."""
    provided = {n.attr("name"): n.outputs[0].type for n in fn.nodes
                if n.op == "constant" and n.attr("name") not in held}
    return ProvidedTensorTable({n: held[n] for n in held}, provided, source)


def empty_causal_lm(config: Any) -> torch.nn.Module:
    """transformers' causal LM for ``config`` whose parameters hold no data: each is a
    zero-stride CPU view of its own scalar (so torch.export sees CPU tensors of the right shape
    and dtype, and tied parameters stay one tensor)."""
    from transformers import AutoModelForCausalLM
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    placeholders: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in placeholders:
                view = torch.zeros((), dtype=p.dtype).expand(p.shape)
                placeholders[id(p)] = torch.nn.Parameter(view, requires_grad=False)
            module._parameters[name] = placeholders[id(p)]
    return model.train(False)


def capture_streamed(config: Any, source: TensorSource, name: str | None = None) -> CapturedModel:
    """The capture of an HF causal LM (``config``: a transformers PretrainedConfig) whose
    parameters are read from ``source`` (HF parameter name -> array) on demand (see the module
    docstring): the module ``capture_causal_lm`` gives for the same model with those weights."""
    from .hf_capture import capture_causal_lm
    return capture_causal_lm(empty_causal_lm(config), name=name, source=source)
