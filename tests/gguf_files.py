"""Tiny llama GGUF files for tests, written with the gguf package's GGUFWriter.

Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized from random float weights with
``gguf.quants.quantize``. The gguf package has no K-quant quantizer, so K-quant tensors are
random blocks encoded here: random code and sub-scale bytes with the fp16 super-block scales
(``d``, ``dmin``) overwritten by small finite values; ``gguf.quants.dequantize`` is the oracle
of what such a block means. Q and K are stored as llama.cpp's converter stores them (rows
permuted per head for its rotary layout), so loaders must undo it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# byte offsets of the fp16 fields of each block type (ggml block_* layouts)
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """uint8 [n_blocks, type_size]: random bytes with finite fp16 scale fields."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    _, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in FP16_FIELDS[type_name]:
        d = (rng.standard_normal(n_blocks) * scale).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF -> GGUF row order of Q/K (llama.cpp convert_hf_to_gguf: per head, interleave halves)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(writer, name: str, w: np.ndarray, type_name: str, rng: np.random.Generator) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize
    if type_name == "F32":
        writer.add_tensor(name, w.astype(np.float32))
        return
    qtype = GGMLQuantizationType[type_name]
    if type_name in LEGACY:
        writer.add_tensor(name, quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
        return
    block, size = GGML_QUANT_SIZES[qtype]
    raw = random_blocks(type_name, w.size // block, rng, scale=0.002).reshape(w.shape[0], -1)
    writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)


def write_tiny_llama(path: Path, types: dict[str, str] | None = None, *, hidden: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, ffn: int = 256, vocab: int = 64, seed: int = 0,
                     tied: bool = True) -> Path:
    """A llama GGUF with a byte-level tokenizer of ``vocab`` tokens. ``types`` maps a tensor kind
    (``attn_q``, ``ffn_down``, ``token_embd``, ``output`` ...) to a ggml type name (default Q8_0
    for token_embd/output, Q4_1 otherwise); rows must be whole blocks (256 for K-quants)."""
    import gguf
    types = {"token_embd": "Q8_0", "output": "Q8_0", **(types or {})}
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [chr(ord("A") + i) if i < 26 else chr(ord("a") + i - 26) if i < 52 else f"<t{i}>" for i in range(vocab)]
    tokens[52] = "AB"
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(["A B"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    head_dim = hidden // heads

    def kind(name: str) -> str:
        return types.get(name, "Q4_1")

    std = 0.1
    _tensor(w, "token_embd.weight", rng.standard_normal((vocab, hidden)) * std, kind("token_embd"), rng)
    for i in range(layers):
        for name, shape in (("attn_q", (heads * head_dim, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
                            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)),
                            ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            x = rng.standard_normal(shape) * std
            if name in ("attn_q", "attn_k"):
                x = llama_permute(x, heads if name == "attn_q" else kv_heads)
            _tensor(w, f"blk.{i}.{name}.weight", x, kind(name), rng)
        for name in ("attn_norm", "ffn_norm"):
            _tensor(w, f"blk.{i}.{name}.weight", 1 + 0.1 * rng.standard_normal(hidden), "F32", rng)
    _tensor(w, "output_norm.weight", 1 + 0.1 * rng.standard_normal(hidden), "F32", rng)
    if not tied:
        _tensor(w, "output.weight", rng.standard_normal((vocab, hidden)) * std, kind("output"), rng)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
