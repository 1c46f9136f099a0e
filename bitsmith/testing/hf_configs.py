"""Small random-init Hugging Face causal LMs of each supported family (the conformance suite
and the tests compile them; needs the `frontend` extra)."""

from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

VOCAB = 128


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed({"llama": 0, "gpt2": 1, "qwen2": 2}[arch])
    if arch == "llama":  # grouped-query attention (4 query / 2 kv heads), tied embeddings
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":  # learned positions, LayerNorm, tanh-GELU, Conv1D projections
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen2":  # q/k/v bias
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.train(False)  # inference mode (torch's eval mode, spelled without eval)


ARCHS = ("llama", "gpt2", "qwen2")
