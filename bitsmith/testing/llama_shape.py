"""A Llama-shaped kv-cache module whose constants are known by shape only (no data): what the
fpga backend's timing-only mode simulates, e.g. LLaMA2-7B (27 GB in fp32) without
materialising it. The graph follows the frontend's capture of LlamaForCausalLM (embedding,
RMSNorm as mean/rsqrt/mul, rotary embedding, grouped-query attention on the kv cache,
SwiGLU MLP, lm_head); linears are ``qlinear`` nodes with declared packed operands when a
scheme is given (``bitsmith.ir.quantized.operand_types``), fp32 ``linear`` otherwise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bitsmith.ir import Function, Module, Node, TensorInfo, TensorType, Value
from bitsmith.ir.builder import GraphBuilder
from bitsmith.ir.declared_tensors import DeclaredTensorTable
from bitsmith.ir.quantized import operand_types


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 32
    intermediate: int = 11008
    layers: int = 32
    vocab: int = 32000
    max_positions: int = 4096
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA2_7B = LlamaShape()


class _Declared:
    def __init__(self, b: GraphBuilder) -> None:
        self.b, self.infos = b, []

    def constant(self, name: str, shape: tuple[int, ...], dtype: str = "float32") -> str:
        self.infos.append(TensorInfo(name, tuple(shape), dtype, hashlib.sha256(name.encode()).hexdigest()))
        out = self.b.fresh()
        t = TensorType(tuple(shape), dtype)
        self.b.nodes.append(Node("constant", (), (Value(out, t),), (("name", name),)))
        self.b.types[out] = t
        return out


def llama_shape_module(shape: LlamaShape = LLAMA2_7B, scheme: str | None = None, group_size: int = 128,
                       sparsity: str = "") -> Module:
    b = GraphBuilder("main")
    c = _Declared(b)
    d, hd, hq, hk = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    ids = b.param("input_ids", TensorType(("batch", "seq"), "int64"))
    pos = b.param("position_ids", TensorType(("batch", "seq"), "int64"))
    pasts = []
    for i in range(shape.layers):
        for kind in ("key", "value"):
            pasts.append(b.param(f"past_{kind}_{i}", TensorType(("batch", hk, "past", hd), "float32")))

    def linear(x: str, name: str, out_f: int, in_f: int, sparse: bool = True) -> str:
        if scheme is None:
            w = c.constant(f"{name}.weight", (out_f, in_f))
            return b.op("linear", (x, w), {"sparsity": sparsity} if sparsity and sparse else None)
        attrs = {"scheme": scheme, "group_size": group_size, "in_features": in_f, "out_features": out_f,
                 "sparsity": sparsity if sparse else "", "outliers": 0.0, "bias": False}
        ops = [c.constant(f"{name}.weight.{role}", t.shape, t.dtype) for role, t in operand_types(attrs)]
        return b.op("qlinear", (x, *ops), attrs)

    def rmsnorm(x: str, name: str) -> str:
        w = c.constant(f"{name}.weight", (d,))
        var = b.op("mean", (b.op("mul", (x, x)),), {"axes": (-1,), "keepdims": True})
        r = b.op("rsqrt", (b.op("add", (var, b.scalar(shape.eps, "float32"))),))
        return b.op("mul", (b.op("mul", (x, r)), w))

    def rope(x: str, cos: str, sin: str, heads: int) -> str:
        x1 = b.op("slice", (x,), {"axis": 3, "start": 0, "end": hd // 2, "step": 1})
        x2 = b.op("slice", (x,), {"axis": 3, "start": hd // 2, "end": hd, "step": 1})
        rot = b.op("concat", (b.op("neg", (x2,)), x1), {"axis": 3})
        return b.op("add", (b.op("mul", (x, cos)), b.op("mul", (rot, sin))))

    def heads_of(x: str, n: int) -> str:
        r = b.op("reshape", (x,), {"shape": ("batch", "seq", n, hd)})
        return b.op("permute", (r,), {"perm": (0, 2, 1, 3)})

    embed = c.constant("model.embed_tokens.weight", (shape.vocab, d))
    x = b.op("embedding", (embed, ids))
    inv = c.constant("model.rotary_emb.inv_freq", (hd // 2,))
    p = b.op("mul", (b.op("cast", (b.op("reshape", (pos,), {"shape": ("batch", "seq", 1)}),), {"dtype": "float32"}), inv))
    emb = b.op("reshape", (b.op("concat", (p, p), {"axis": 2}),), {"shape": ("batch", 1, "seq", hd)})
    cos, sin = b.op("cos", (emb,)), b.op("sin", (emb,))
    presents = []
    for i in range(shape.layers):
        pre = f"model.layers.{i}"
        h = rmsnorm(x, f"{pre}.input_layernorm")
        q = rope(heads_of(linear(h, f"{pre}.self_attn.q_proj", d, d), hq), cos, sin, hq)
        k = rope(heads_of(linear(h, f"{pre}.self_attn.k_proj", hk * hd, d), hk), cos, sin, hk)
        v = heads_of(linear(h, f"{pre}.self_attn.v_proj", hk * hd, d), hk)
        pk = b.op("concat", (pasts[2 * i], k), {"axis": 2}, name=f"present_key_{i}")
        pv = b.op("concat", (pasts[2 * i + 1], v), {"axis": 2}, name=f"present_value_{i}")
        presents += [pk, pv]
        a = b.op("attention", (q, pk, pv), {"scale": hd ** -0.5, "causal": True})
        a = b.op("reshape", (b.op("permute", (a,), {"perm": (0, 2, 1, 3)}),), {"shape": ("batch", "seq", d)})
        x = b.op("add", (x, linear(a, f"{pre}.self_attn.o_proj", d, d)))
        h = rmsnorm(x, f"{pre}.post_attention_layernorm")
        g = linear(h, f"{pre}.mlp.gate_proj", shape.intermediate, d)
        u = linear(h, f"{pre}.mlp.up_proj", shape.intermediate, d)
        m = linear(b.op("mul", (b.op("silu", (g,)), u)), f"{pre}.mlp.down_proj", d, shape.intermediate)
        x = b.op("add", (x, m))
    logits = linear(rmsnorm(x, "model.norm"), "lm_head", shape.vocab, d, sparse=False)
    fn = Function("main", tuple(b.params), tuple(b.nodes), (logits, *presents))
    attrs = {"kind": "causal_lm", "architecture": "LlamaForCausalLM", "max_positions": shape.max_positions,
             "num_layers": shape.layers, "vocab_size": shape.vocab}
    return Module((fn,), DeclaredTensorTable(declared=c.infos), tuple(sorted(attrs.items())))
