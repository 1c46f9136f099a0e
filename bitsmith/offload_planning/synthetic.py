"""LLaMA-shaped decode modules built from a config alone: shapes, no weights.

The module has the form the frontend and the ``kv-cache`` pass give a captured Hugging Face
Llama (``main(input_ids, position_ids, past_key_i, past_value_i...) -> (logits,
present_key_i, present_value_i...)``, RMSNorm as pow/mean/add/rsqrt/mul, rotary embedding
by slice/neg/concat, SwiGLU MLP), but its constants are declared by name, shape and dtype
only (a ``DeclaredTensorTable``): a 70B model costs nothing to build. A test checks that a
small config gives the same cost profile as the captured random-init model of that config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelLoadError
from ..ir import GraphBuilder, Module, Node, TensorInfo, TensorType, Value, verify_module
from ..ir.declared_tensors import DeclaredTensorTable
from ..ir.graph import freeze_attrs

DTYPE = "float32"  # as the frontend captures; plan other precisions with ElementSizes
_UNKNOWN_SHA = "0" * 64  # declared tensors of a synthetic module have no data to hash


@dataclass(frozen=True)
class LlamaShape:
    """The dims of a LLaMA-family decoder (Hugging Face LlamaConfig names)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config: Mapping[str, Any], where: str = "config") -> "LlamaShape":
        """From a Hugging Face ``config.json`` mapping (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names and v is not None}
        values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is not None
                   and f.name not in ("tie_word_embeddings", "rms_norm_eps", "max_position_embeddings")]
        if missing:
            raise ModelLoadError(f"{where}: a LLaMA-shaped config needs {', '.join(missing)}")
        return cls(**values)


# Published configs (Hugging Face config.json of each model).
SHAPES: dict[str, LlamaShape] = {
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": LlamaShape(4096, 11008, 32, 32, 32, 32000, rms_norm_eps=1e-5),
    # meta-llama/Llama-2-70b-hf (grouped-query attention, 8 KV heads)
    "llama2-70b": LlamaShape(8192, 28672, 80, 64, 8, 32000, rms_norm_eps=1e-5),
    # HuggingFaceTB/SmolLM2-135M (3 KV heads, tied embeddings)
    "smollm2-135m-shape": LlamaShape(576, 1536, 30, 9, 3, 49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                     max_position_embeddings=8192),
}


def shape_from_file(path: str | Path) -> LlamaShape:
    p = Path(path)
    try:
        config = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read config {p}: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"config {p} must hold a JSON object")
    return LlamaShape.from_config(config, str(p))


class _DeclaredBuilder(GraphBuilder):
    """GraphBuilder whose constants are declared (shape only) instead of holding data."""

    def __init__(self) -> None:
        super().__init__("main")
        self.declared: dict[str, TensorInfo] = {}

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        t = TensorType(shape, DTYPE)
        self.declared.setdefault(name, TensorInfo(name, shape, DTYPE, _UNKNOWN_SHA))
        out = self.fresh()
        self.nodes.append(Node("constant", (), (Value(out, t),), freeze_attrs({"name": name})))
        self.types[out] = t
        return out


def _rms_norm(b: _DeclaredBuilder, x: str, weight: str, two: str, eps: str) -> str:
    r = b.op("rsqrt", [b.op("add", [b.op("mean", [b.op("pow", [x, two])], {"axes": (2,), "keepdims": True}), eps])])
    return b.op("mul", [weight, b.op("mul", [x, r])])


def _heads(b: _DeclaredBuilder, x: str, heads: int, hd: int) -> str:
    return b.op("permute", [b.op("reshape", [x], {"shape": ("batch", "seq", heads, hd)})], {"perm": (0, 2, 1, 3)})


def _rotate(b: _DeclaredBuilder, x: str, cos: str, sin: str, hd: int) -> str:
    lo = b.op("slice", [x], {"axis": 3, "start": 0, "end": hd // 2, "step": 1})
    hi = b.op("slice", [x], {"axis": 3, "start": hd // 2, "end": hd, "step": 1})
    rotated = b.op("concat", [b.op("neg", [hi]), lo], {"axis": 3})
    return b.op("add", [b.op("mul", [x, cos]), b.op("mul", [rotated, sin])])


def synthetic_llama(shape: LlamaShape, name: str = "") -> Module:
    """The decode module of ``shape`` with its KV cache, before any partition."""
    s, hd = shape, shape.dim_per_head
    b = _DeclaredBuilder()
    ids = b.param("input_ids", TensorType(("batch", "seq"), "int64"))
    pos = b.param("position_ids", TensorType(("batch", "seq"), "int64"))
    past = [(b.param(f"past_key_{i}", TensorType(("batch", s.num_key_value_heads, "past", hd), DTYPE)),
             b.param(f"past_value_{i}", TensorType(("batch", s.num_key_value_heads, "past", hd), DTYPE)))
            for i in range(s.num_hidden_layers)]
    lm_head = b.weight("lm_head.weight", (s.vocab_size, s.hidden_size))
    table = lm_head if s.tie_word_embeddings else b.weight("model.embed_tokens.weight", (s.vocab_size, s.hidden_size))
    x = b.op("embedding", [table, ids])
    inv_freq = b.weight("model.rotary_emb.inv_freq", (hd // 2,))
    freqs = b.op("mul", [b.op("cast", [b.op("reshape", [pos], {"shape": ("batch", "seq", 1)})], {"dtype": DTYPE}),
                         inv_freq])
    angles = b.op("concat", [freqs, freqs], {"axis": 2})
    one = b.scalar(1.0, DTYPE)
    cos_ = b.op("mul", [b.op("cos", [angles]), one])
    sin_ = b.op("mul", [b.op("sin", [angles]), one])
    two, eps = b.scalar(2.0, DTYPE), b.scalar(s.rms_norm_eps, DTYPE)
    cos = b.op("reshape", [cos_], {"shape": ("batch", 1, "seq", hd)})
    sin = b.op("reshape", [sin_], {"shape": ("batch", 1, "seq", hd)})
    presents: list[str] = []
    for i, (past_k, past_v) in enumerate(past):
        p = f"model.layers.{i}."
        h = _rms_norm(b, x, b.weight(p + "input_layernorm.weight", (s.hidden_size,)), two, eps)
        q = _heads(b, b.op("linear", [h, b.weight(p + "self_attn.q_proj.weight", (s.num_attention_heads * hd,
                                                                                 s.hidden_size))]),
                   s.num_attention_heads, hd)
        kv_width = s.num_key_value_heads * hd
        k = _heads(b, b.op("linear", [h, b.weight(p + "self_attn.k_proj.weight", (kv_width, s.hidden_size))]),
                   s.num_key_value_heads, hd)
        v = _heads(b, b.op("linear", [h, b.weight(p + "self_attn.v_proj.weight", (kv_width, s.hidden_size))]),
                   s.num_key_value_heads, hd)
        q, k = _rotate(b, q, cos, sin, hd), _rotate(b, k, cos, sin, hd)
        keys = b.op("concat", [past_k, k], {"axis": 2}, name=f"present_key_{i}")
        values = b.op("concat", [past_v, v], {"axis": 2}, name=f"present_value_{i}")
        att = b.op("attention", [q, keys, values], {"scale": hd ** -0.5, "causal": True})
        att = b.op("reshape", [b.op("permute", [att], {"perm": (0, 2, 1, 3)})],
                   {"shape": ("batch", "seq", s.num_attention_heads * hd)})
        x = b.op("add", [x, b.op("linear", [att, b.weight(p + "self_attn.o_proj.weight",
                                                           (s.hidden_size, s.num_attention_heads * hd))])])
        h = _rms_norm(b, x, b.weight(p + "post_attention_layernorm.weight", (s.hidden_size,)), two, eps)
        gate = b.op("silu", [b.op("linear", [h, b.weight(p + "mlp.gate_proj.weight",
                                                         (s.intermediate_size, s.hidden_size))])])
        up = b.op("linear", [h, b.weight(p + "mlp.up_proj.weight", (s.intermediate_size, s.hidden_size))])
        down = b.op("linear", [b.op("mul", [gate, up]), b.weight(p + "mlp.down_proj.weight",
                                                                 (s.hidden_size, s.intermediate_size))])
        x = b.op("add", [x, down])
        presents += [keys, values]
    logits = b.op("linear", [_rms_norm(b, x, b.weight("model.norm.weight", (s.hidden_size,)), two, eps), lm_head])
    layers = s.num_hidden_layers
    attrs = {"kind": "causal_lm", "architecture": "LlamaForCausalLM", "model_name": name, "synthetic": True,
             "vocab_size": s.vocab_size, "max_positions": s.max_position_embeddings, "num_layers": layers,
             "kv_heads": (s.num_key_value_heads,) * layers, "key_dims": (hd,) * layers,
             "value_dims": (hd,) * layers}
    table_ = DeclaredTensorTable(declared=b.declared.values())
    return verify_module(Module((b.function([logits] + presents),), table_, freeze_attrs(attrs)))
