"""A GGUF file's byte-level BPE tokenizer written straight from its metadata as ``tokenizers``
JSON, without transformers (its GGUF conversion costs ~9 s of CPU on SmolLM2's 49,152 tokens
and 48,900 merges; this takes ~0.3 s).

Only what a capture records is built: the JSON text, BOS/EOS ids and the chat template. The
JSON is the one transformers' conversion gives for the same file (tests compare the two
strings); files this does not cover return None and go through transformers.

Facts used (the GGUF tokenizer keys, llama.cpp's ``gguf-py/gguf/constants.py``; the GPT-2 byte
alphabet, OpenAI's GPT-2 ``encoder.py``; what transformers' converter makes of them):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE; ``tokens`` are written in the byte
  alphabet, ``merges`` are "left right" strings, ``token_type`` 3 is CONTROL (an added special
  token, never split, when spelled in the byte alphabet) and 4 USER_DEFINED (an added token
  that is not special);
* the pre-tokenizer is GPT-2's ByteLevel regex for the ``tokenizer.ggml.pre`` values listed in
  ``DEFAULT_SPLIT_PRE`` (others use their own split regex: not handled here);
* the vocabulary holds ``<|endoftext|>`` (else transformers appends it as a new token);
* no BOS/EOS is added to encoded text when ``add_bos_token`` / ``add_eos_token`` are false or
  absent (the post-processor then passes sequences through).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..gguf import GGUFFile

CONTROL, USER_DEFINED = 3, 4
DEFAULT_SPLIT_PRE = ("smollm",)  # checked against transformers' conversion (tests)
# transformers' GPT-2 tokenizer adds this token (its default unk/bos/eos) when the vocabulary lacks
# it; such files are left to transformers rather than copying that quirk
GPT2_DEFAULT_SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class GGUFTokenizer:
    """What ``capture_causal_lm`` reads from a tokenizer: ``backend_tokenizer.to_str()``, the
    BOS/EOS ids and the chat template (a stand-in for the HF tokenizer during capture only)."""

    text: str
    bos_token_id: int | None
    eos_token_id: int | None
    chat_template: str | None

    @property
    def backend_tokenizer(self) -> "GGUFTokenizer":
        return self

    def to_str(self) -> str:
        return self.text


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of each byte value 0..255: printable Latin-1 bytes stand for
    themselves, the other 68 take the code points from 256 up, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _byte_level(add_prefix_space: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": True}


def _added(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def tokenizer_of(f: GGUFFile) -> GGUFTokenizer | None:
    """The tokenizer of ``f`` (None: a kind this module does not build; use transformers)."""
    fields = f.fields
    if fields.get("tokenizer.ggml.model") != "gpt2" or fields.get("tokenizer.ggml.pre") not in DEFAULT_SPLIT_PRE:
        return None
    if fields.get("tokenizer.ggml.add_bos_token") or fields.get("tokenizer.ggml.add_eos_token"):
        return None
    tokens, merges = f.array("tokenizer.ggml.tokens"), f.array("tokenizer.ggml.merges")
    if not tokens or merges is None:
        return None
    types = f.array("tokenizer.ggml.token_type") or [0] * len(tokens)
    spelling = byte_alphabet()
    alphabet = set(spelling)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):  # a token outside the alphabet is spelled byte by byte
        vocab.setdefault(tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")), i)
    if len(vocab) != len(tokens) or GPT2_DEFAULT_SPECIAL not in vocab:
        return None  # duplicate spellings, or transformers would append its GPT-2 default token
    added = [_added(i, tok, True) for i, (tok, kind) in enumerate(zip(tokens, types))
             if kind == CONTROL and set(tok) <= alphabet]
    added += [_added(i, tok, False) for i, (tok, kind) in enumerate(zip(tokens, types))
              if kind == USER_DEFINED and tok in vocab]
    pairs = [m.split(" ") for m in merges]
    if any(len(p) != 2 for p in pairs):
        return None
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": sorted(added, key=lambda a: a["id"]),
        "normalizer": None,
        "pre_tokenizer": _byte_level(False),
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": _byte_level(True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }
    ids = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")]
    bos, eos = (i if isinstance(i, int) and 0 <= i < len(tokens) else None for i in ids)
    template = fields.get("tokenizer.chat_template")
    return GGUFTokenizer(json.dumps(doc, ensure_ascii=False, separators=(",", ":")), bos, eos,
                         template if isinstance(template, str) else None)
