"""Loading a llama-architecture GGUF file directly: tensors read with the ``gguf`` package's
reader (memory-mapped), quantized blocks decoded with numpy (``bitsmith.ir.gguf_blocks``), the
HF state dict and config built from them. transformers' own GGUF path reads the file several
times and dequantizes tensor by tensor; this one reads it once.

The weights are exactly what transformers' loader produces: the same dequantized values (the
decoders are bit-identical to ``gguf.quants.dequantize``) and the same layout. Facts used
(transformers ``modeling_gguf_pytorch_utils`` / llama.cpp ``convert_hf_to_gguf.py``):

* names: ``token_embd`` -> ``model.embed_tokens``, ``output_norm`` -> ``model.norm``,
  ``output`` -> ``lm_head`` (absent: tied to the embedding), ``blk.N.{attn_q,attn_k,attn_v,
  attn_output,ffn_gate,ffn_up,ffn_down,attn_norm,ffn_norm}`` -> ``model.layers.N.{self_attn.
  q_proj,...,mlp.down_proj,input_layernorm,post_attention_layernorm}``;
* llama.cpp stores the rows of Q (``n_head`` heads) and K (``n_head_kv`` heads) permuted for
  its rotary layout: per head, row ``2*i + j`` of the GGUF holds HF row ``j*half + i``
  (``half = head_dim // 2``); loading undoes it with the inverse row order;
* GGUF dims are listed fastest first: a [out, in] matrix has ``shape = (in, out)``.

A capture takes the tokenizer from ``gguf_tokenizer`` (byte-level BPE written from the metadata);
otherwise it comes from transformers' GGUF tokenizer conversion, cached by file content under
``$BITSMITH_CACHE_DIR/gguf-tokenizers``.
Architectures other than llama return None: the caller falls back to transformers.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..gguf import GGUFFile, QuantizedRows, TensorInfo, decode_rows, format_of, open_gguf

SUPPORTED_ARCHITECTURES = ("llama",)
FLOAT_TYPES = {"F32": "<f4", "F16": "<f2"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class UnsupportedGGUF(Exception):
    """The fast path does not handle this file; transformers' loader is used instead."""


def hf_name(gguf_name: str) -> str:
    """The HF llama parameter name of a GGUF tensor name (UnsupportedGGUF if unknown)."""
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise UnsupportedGGUF(f"tensor {gguf_name!r} has no llama mapping")


def unpermute_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that turns a GGUF Q/K matrix (llama.cpp's rotary permutation) into HF's."""
    half = rows // heads // 2
    # GGUF row (h, i, j) [h*2*half + 2*i + j] holds HF row (h, j, i) [h*2*half + j*half + i]
    return np.arange(rows).reshape(heads, half, 2).transpose(0, 2, 1).reshape(rows)


@dataclass(frozen=True)
class QuantizedSource:
    """Where one quantized tensor lies in the file and the row order HF wants."""

    info: TensorInfo
    order: np.ndarray | None  # Q/K: GGUF row -> HF row order; None: as stored


class LazyBlocks(Mapping[str, QuantizedRows]):
    """Name -> decoded blocks, decoded from the memory-mapped file when asked (never all kept:
    codes take a byte per weight, so a 7B model's would not fit beside its float weights)."""

    def __init__(self, file: GGUFFile, sources: Mapping[str, QuantizedSource]) -> None:
        self.file, self.sources = file, dict(sources)

    def __getitem__(self, name: str) -> QuantizedRows:
        src = self.sources[name]
        q = decode_rows(format_of(src.info.type_id, src.info.type_name), self.file.tensor_bytes(src.info),
                        *src.info.shape)
        return q if src.order is None else q.take_rows(src.order)

    def __contains__(self, name: object) -> bool:
        return name in self.sources  # Mapping's default would decode the tensor to answer

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


@dataclass(frozen=True)
class GGUFWeights:
    """A GGUF file's tensors under their HF names: float tensors as arrays, quantized ones as
    blocks decoded on demand (rows in HF order), plus the metadata the config needs."""

    file: GGUFFile
    fields: dict[str, Any]
    floats: dict[str, np.ndarray]
    quantized: LazyBlocks

    def state_dict(self) -> dict[str, np.ndarray]:
        out = dict(self.floats)
        for name in self.quantized:
            out[name] = self.quantized[name].dequantize()
        return out


def read_gguf(path: str | Path) -> GGUFWeights:
    """A llama GGUF's metadata and tensors (UnsupportedGGUF: another architecture or tensor)."""
    f = open_gguf(path)
    fields = f.fields
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUF(f"architecture {arch!r}")
    heads = int(fields[f"{arch}.attention.head_count"])
    kv_heads = int(fields.get(f"{arch}.attention.head_count_kv") or heads)
    floats: dict[str, np.ndarray] = {}
    quantized: dict[str, QuantizedSource] = {}
    for t in f.tensors:
        name = hf_name(t.name)
        order = None
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            order = unpermute_rows(t.shape[0], heads if "q_proj" in name else kv_heads)
        if t.type_name in FLOAT_TYPES:
            a = f.tensor_bytes(t).view(FLOAT_TYPES[t.type_name]).astype(np.float32).reshape(t.shape)
            floats[name] = a if order is None else a[order]
            continue
        if len(t.shape) != 2:
            raise UnsupportedGGUF(f"quantized tensor {t.name} of rank {len(t.shape)}")
        format_of(t.type_id, t.type_name)  # an undecodable type falls back to transformers now
        quantized[name] = QuantizedSource(t, order)
    return GGUFWeights(f, fields, floats, LazyBlocks(f, quantized))


def llama_config(fields: dict[str, Any], vocab_size: int, tied: bool) -> Any:
    """The HF LlamaConfig of a llama GGUF's metadata (the keys transformers maps the same way)."""
    from transformers import LlamaConfig
    a = "llama"
    hidden = int(fields[f"{a}.embedding_length"])
    heads = int(fields[f"{a}.attention.head_count"])
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=int(fields[f"{a}.feed_forward_length"]),
        num_hidden_layers=int(fields[f"{a}.block_count"]), num_attention_heads=heads,
        num_key_value_heads=int(fields.get(f"{a}.attention.head_count_kv") or heads),
        max_position_embeddings=int(fields[f"{a}.context_length"]),
        rms_norm_eps=float(fields[f"{a}.attention.layer_norm_rms_epsilon"]),
        tie_word_embeddings=tied, dtype="float32")
    if fields.get(f"{a}.rope.freq_base") is not None:
        kwargs["rope_theta"] = float(fields[f"{a}.rope.freq_base"])
    head_dim = fields.get(f"{a}.rope.dimension_count")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise UnsupportedGGUF(f"rope dimension {head_dim} != head dim {hidden // heads}")
    for key, attr in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id"),
                      ("tokenizer.ggml.padding_token_id", "pad_token_id")):
        if key in fields and fields[key] is not None:
            kwargs[attr] = int(fields[key])
    return LlamaConfig(**kwargs)


def build_model(weights: GGUFWeights) -> Any:
    """An HF LlamaForCausalLM (float32, inference mode) holding exactly the file's weights."""
    import torch
    from transformers import LlamaForCausalLM
    sd = weights.state_dict()
    tied = "lm_head.weight" not in sd
    vocab = int(weights.fields.get("llama.vocab_size") or sd["model.embed_tokens.weight"].shape[0])
    config = llama_config(weights.fields, vocab, tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedGGUF(f"no tensor for {missing[0]}")
    _rotary_on_cpu(model)
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise UnsupportedGGUF(f"buffer {name} was not materialized")
    return model.train(False)


def _rotary_on_cpu(model: Any) -> None:
    """Rebuilds modules whose buffers were created on the meta device (rotary embeddings)."""
    import torch
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if any(b.is_meta for b in child.buffers(recurse=False)) and not any(True for _ in child.parameters()):
                with torch.device("cpu"):
                    setattr(parent, child_name, type(child)(config=model.config))


def _tokenizer_cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "bitsmith") / "gguf-tokenizers"


def load_tokenizer(f: GGUFFile) -> Any:
    """transformers' tokenizer of a GGUF, converted once per file header (the tokenizer is a
    function of the metadata alone) and transformers version, then loaded from the cache (a
    tokenizer directory saved by transformers)."""
    import transformers
    from transformers import AutoTokenizer
    path = f.path
    h = hashlib.sha256(f.header_bytes())
    h.update(transformers.__version__.encode())
    key = h.hexdigest()[:32]
    cached = _tokenizer_cache_dir() / key
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a damaged entry: convert again below
            pass
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cached.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)  # atomic: a concurrent compile sees a whole entry or none
    except OSError:
        pass  # a read-only cache costs only time
    return tok


def blocks_by_parameter(model: Any, weights: GGUFWeights) -> LazyBlocks:
    """The file's quantized tensors under every name a parameter has in ``model``, tied ones
    included (a tied lm_head is captured as ``lm_head.weight``; the file stores ``token_embd``)."""
    owner = {p.data_ptr(): name for name, p in model.named_parameters()}
    sources = weights.quantized.sources
    return LazyBlocks(weights.file, {name: sources[owner[p.data_ptr()]]
                                     for name, p in model.named_parameters(remove_duplicate=False)
                                     if owner.get(p.data_ptr()) in sources})


def load_gguf_model(path: str | Path, hf_tokenizer: bool = True) -> tuple[Any, Any, GGUFWeights]:
    """(HF model, tokenizer, the decoded weights) of a llama GGUF; UnsupportedGGUF otherwise.
    ``hf_tokenizer=False`` (a capture): the tokenizer may be ``gguf_tokenizer.GGUFTokenizer``,
    which only carries what a capture records, built without transformers' conversion."""
    from .gguf_tokenizer import tokenizer_of
    weights = read_gguf(path)
    tokenizer = None if hf_tokenizer else tokenizer_of(weights.file)
    return build_model(weights), tokenizer or load_tokenizer(weights.file), weights
