"""Small hand-built compiled models and manifest surgery shared by the artifact and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitsmith.backends.reference import ReferenceBackend
from bitsmith.ir import GraphBuilder, Module, TensorType
from bitsmith.runtime import CompiledModel, LanguageModelInfo
from bitsmith.runtime.manifest import HASH_FIELD, MANIFEST, manifest_hash


def small_module(attrs: dict[str, Any] | None = None) -> Module:
    """x[batch, 4] -> silu(linear(x, W[3, 4]))."""
    b = GraphBuilder()
    x = b.param("x", TensorType(("batch", 4), "float32"))
    w = b.constant("fc.weight", np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))
    return b.module([b.op("silu", [b.op("linear", [x, w])])], attrs or {"kind": "test"})


def compiled(module: Module | None = None, **fields: Any) -> CompiledModel:
    module = module or small_module()
    executable = ReferenceBackend().build(module, "reference", {})
    return CompiledModel(module, executable, "reference", **fields)


VOCAB = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
# Greedy decoding of this "language model" continues 0->2, 1->0, 2->3, 3->1:
# "hello" -> "world" -> <eos>.
NEXT_TOKEN = {0: 2, 1: 0, 2: 3, 3: 1}


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(["<unk>", "<eos>"])
    return tok.to_str()


def tiny_causal_lm_module() -> Module:
    """``main(input_ids, position_ids, past_key_0, past_value_0)`` as generate.py expects:
    one-hot embedding, a permutation "head" (logits[j] = W[j, t]) and a KV cache that only
    grows, so greedy decoding follows NEXT_TOKEN."""
    b = GraphBuilder()
    ids = b.param("input_ids", TensorType(("batch", "seq"), "int64"))
    b.param("position_ids", TensorType(("batch", "seq"), "int64"))
    past = [b.param(n, TensorType(("batch", "past", 4), "float32")) for n in ("past_key_0", "past_value_0")]
    head = np.zeros((4, 4), np.float32)
    for token, nxt in NEXT_TOKEN.items():
        head[nxt, token] = 1.0
    hidden = b.op("embedding", [b.constant("embed", np.eye(4, dtype=np.float32)), ids])
    logits = b.op("linear", [hidden, b.constant("head", head)])
    present = [b.op("concat", [p, hidden], {"axis": 1}) for p in past]
    return b.module([logits, *present], {"kind": "causal_lm"})


def language_model(tokenizer: bool = True) -> CompiledModel:
    lm = LanguageModelInfo(tiny_tokenizer_json() if tokenizer else None, bos_token_id=None,
                           eos_token_id=VOCAB["<eos>"])
    return compiled(tiny_causal_lm_module(), lm=lm)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None], resign: bool = True) -> None:
    """Applies ``edit`` to the manifest; with ``resign`` also recomputes its self-hash, so the
    edit gets past the hash check and reaches the deeper validation it targets."""
    manifest = read_json(path)
    edit(manifest)
    if resign:
        manifest[HASH_FIELD] = manifest_hash(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
