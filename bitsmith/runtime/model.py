"""CompiledModel: what ``bitsmith.compile`` returns and ``bitsmith.load`` gives back.

It is stateless between calls (the KV cache lives only inside ``generate``), and it never
imports the frontend or passes: a loaded artifact runs without capture or re-compilation.
Calls (``__call__``, ``run``, ``generate``) may come from several threads at once; each
executable makes that safe (see ``Executable.run``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..backends.base import Executable
from ..ir import Module
from ..ir.bcq import bits_per_layer
from ..ir.traits import QUANTIZED, has_trait
from .generate import MASK_PARAM, decode_generate, forward_logits, has_attention_mask
from .padding import check_attention_mask, left_pad
from .sampling import SamplingConfig
from .text import stop_string_check


@dataclass
class LanguageModelInfo:
    """Tokenizer and special ids shipped with a causal LM."""

    tokenizer_json: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # the jinja chat template (GGUF tokenizer.chat_template or tokenizer_config.json); None when
    # the model has none or the artifact predates templates (see runtime/chat_template.py)
    chat_template: str | None = None


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_torch(a: np.ndarray, dtype: Any = "float32") -> Any:
    """``a`` as a torch tensor of ``dtype`` (None: keep a's dtype), or as numpy without torch."""
    a = np.ascontiguousarray(a, dtype=dtype)
    try:
        import torch
    except ImportError:  # a deployed artifact may run without torch: hand back numpy
        return a
    return torch.from_numpy(a)


def linear_storage(module: Module) -> tuple[int, int, int]:
    """(bytes stored, weights, quantized layer count) over the weight-bearing linear layers.

    With quantized layers present, only those count (issue 3's bits per weight: codes, scales,
    zero points, selectors, N:M metadata, outliers; never biases); otherwise the dense linear
    weights do, so an fp32 model reports 32 bits per weight.
    """
    sizes = {n: module.tensors[n].nbytes for n in module.tensors}
    q_bytes = q_weights = q_layers = d_bytes = d_weights = 0
    for fn in module.functions:
        const = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
        for node in fn.nodes:
            if has_trait(node.op, QUANTIZED):  # qlinear, bcq_linear: same attribute names
                operands = node.inputs[1:len(node.inputs) - (1 if node.attr("bias") else 0)]
                q_bytes += sum(sizes[const[v]] for v in operands if v in const)
                q_weights += node.attr("in_features") * node.attr("out_features")
                q_layers += 1
            elif node.op == "linear" and node.inputs[1] in const:
                d_bytes += sizes[const[node.inputs[1]]]
                d_weights += module.tensors[const[node.inputs[1]]].size
    return (q_bytes, q_weights, q_layers) if q_layers else (d_bytes, d_weights, 0)


@dataclass
class CompiledModel:
    module: Module
    executable: Executable
    target: str
    options: dict[str, Any] = field(default_factory=dict)
    lm: LanguageModelInfo | None = None
    compile_info: dict[str, Any] = field(default_factory=dict)
    # Seconds per compile phase ("seconds") and per pass ("pass_seconds") of a compile in this
    # process. Never saved (artifacts are deterministic), so a loaded model has none.
    timings: dict[str, Any] = field(default_factory=dict)

    # generate() on in-place KV caches where the executable offers them (``kv_session``);
    # False: every step returns concat(past, new) (comparisons, benchmarks)
    # keyword-only: subclasses (OffloadedModel) add positional fields after these
    kv_inplace: bool = field(default=True, repr=False, compare=False, kw_only=True)

    @property
    def is_language_model(self) -> bool:
        return self.module.attr("kind") == "causal_lm"

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Runs ``function`` on positional ``args``. A language model's ``main`` takes its
        trailing ``attention_mask`` as optional: left out, every key is attended."""
        if self.is_language_model and function == "main":
            params = self.module.function("main").params
            if len(args) == len(params) - 1 and params[-1].name == MASK_PARAM and len(args) >= 3:
                ids, cache = np.asarray(args[0]), args[2]
                ones = np.ones((ids.shape[0], np.shape(cache)[2] + ids.shape[1]), dtype=np.int64)
                args = [*args, ones]
        return self.executable.run(function, args)

    def __call__(self, *inputs: Any, attention_mask: Any = None) -> Any:
        if self.is_language_model:
            if len(inputs) != 1:
                raise TypeError(f"a compiled language model takes input_ids only, got {len(inputs)} inputs")
            ids = _to_numpy(inputs[0]).astype(np.int64)
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [batch, seq] with seq >= 1, got shape {ids.shape}")
            mask = None if attention_mask is None else check_attention_mask(_to_numpy(attention_mask), ids.shape)
            return _to_torch(forward_logits(self.run, self.module, ids, mask))
        outs = self.run("main", [_to_numpy(x) for x in inputs])
        outs = [_to_torch(o, None) for o in outs]  # each output keeps its dtype (int64 indices stay int64)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def generate(self, input_ids: Any, max_new_tokens: int = 20,
                 eos_token_id: int | Sequence[int] | None = None, *, do_sample: bool = False,
                 temperature: float | None = None, top_k: int | None = 50, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, pad_token_id: int | None = None,
                 stop_strings: str | Sequence[str] | None = None, streamer: Any = None,
                 attention_mask: Any = None) -> Any:
        """[batch, prompt + new] ids, with transformers' argument names and defaults: greedy
        unless ``do_sample``; then temperature 1, top_k 50, top_p 1, no min_p (None: default).
        A ragged batch comes left-padded with ``attention_mask`` [batch, prompt] (1 = token),
        or as a list of token-id lists of different lengths, which is left-padded here with
        ``pad_token_id`` (default: the first eos id, else 0); the result keeps that padding.
        ``eos_token_id`` is an id or a list of ids (None: no stop on tokens); ``stop_strings``
        stop a row once its generated text contains one (decoded with the artifact's tokenizer);
        ``seed`` makes sampled runs repeat exactly (see ``runtime/sampling.py`` for the order
        of the processors and the generator)."""
        if not self.is_language_model:
            raise TypeError("generate() needs a causal language model; this module is a plain "
                            "nn.Module compiled through torch.fx")
        config = SamplingConfig(do_sample=do_sample, temperature=1.0 if temperature is None else temperature,
                                top_k=top_k, top_p=1.0 if top_p is None else top_p, min_p=min_p,
                                repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
                                seed=seed)
        if isinstance(input_ids, (list, tuple)) and input_ids and not np.isscalar(input_ids[0]):
            if attention_mask is not None:
                raise ValueError("generate: give either a list of token-id lists or attention_mask, not both")
            eos = np.atleast_1d(eos_token_id) if eos_token_id is not None else []
            fill = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
            input_ids, attention_mask = left_pad(input_ids, fill)
        ids = _to_numpy(input_ids)
        mask = None if attention_mask is None else _to_numpy(attention_mask)
        check = None
        if stop_strings:
            tokenizer = self.tokenizer()
            stop = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
            check = stop_string_check(tokenizer.decode, np.shape(ids)[-1], stop)
        session = self.executable.kv_session() if self.kv_inplace and has_attention_mask(self.module) else None
        out = decode_generate(self.run, self.module, ids, max_new_tokens, eos_token_id, config,
                              pad_token_id, check, streamer, mask, session)
        return _to_torch(out, "int64")

    def tokenizer(self) -> Any:
        if self.lm is None or self.lm.tokenizer_json is None:
            raise ValueError("this compiled model carries no tokenizer")
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.lm.tokenizer_json)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` from the artifact's chat template (as transformers'
        ``apply_chat_template(..., tokenize=False)``); ChatTemplateError when there is none."""
        from .chat_template import render_chat
        lm = self.lm or LanguageModelInfo()
        return render_chat(lm.chat_template, messages, add_generation_prompt, *self._bos_eos_strings)

    @functools.cached_property
    def _bos_eos_strings(self) -> tuple[str | None, str | None]:
        """The BOS/EOS token strings a chat template sees, built once: rebuilding the tokenizer
        from its JSON for every chat request costs ~0.15 s (the server renders one per request)."""
        lm = self.lm or LanguageModelInfo()
        tokenizer = self.tokenizer() if lm.tokenizer_json is not None else None

        def token(i: int | None) -> str | None:
            return tokenizer.id_to_token(i) if tokenizer is not None and i is not None else None
        return token(lm.bos_token_id), token(lm.eos_token_id)

    def save(self, path: str) -> None:
        from .artifact import save_artifact
        save_artifact(self, path)

    def report(self) -> dict[str, Any]:
        tensors = self.module.tensors
        params = int(sum(tensors[n].size for n in tensors))
        weight_bytes = int(tensors.nbytes())
        from .artifact import op_counts
        layer_bytes, layer_weights, quantized = linear_storage(self.module)
        timings = {}
        if self.timings:
            timings = {"pass_seconds": dict(self.timings.get("pass_seconds", {})),
                       "compile_seconds": dict(self.timings.get("seconds", {}))}
        return {
            "target": self.target,
            "params": params,
            "weight_bytes": weight_bytes,
            "model_bytes": weight_bytes,
            "bits_per_weight": (8.0 * layer_bytes / layer_weights) if layer_weights else 0.0,
            "quantized_layers": quantized,
            "bits_per_layer": bits_per_layer(self.module),  # planes of each bcq_linear (shiftadd)
            "linear_weights": layer_weights,
            "linear_bytes": layer_bytes,
            "op_counts": op_counts(self.module),
            **timings,
            "options": dict(self.options),
            "executable": self.executable.report(),
        }
