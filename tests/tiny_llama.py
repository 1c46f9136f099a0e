"""A random-init Llama saved as a Hugging Face directory with a word-level tokenizer
(words ``w1 .. w127``, ``<eos>`` = 0), shared by the CLI and perplexity tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tiny_llama(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from bitsmith.testing.hf_configs import VOCAB, make_model

    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(WordLevel(words, unk_token="w1"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_text(n_words: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """Text of ``n_words`` random words and the token ids it encodes to."""
    from bitsmith.testing.hf_configs import VOCAB

    ids = np.random.default_rng(seed).integers(1, VOCAB, n_words)
    return " ".join(f"w{i}" for i in ids), ids.astype(np.int64)
