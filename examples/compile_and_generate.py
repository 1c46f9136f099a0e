"""Compile the embedded default model, save it, load the artifact and generate text.

    python examples/compile_and_generate.py "The capital of France is"
"""

from __future__ import annotations

import sys
import tempfile

import torch

import bitsmith


def main(prompt: str) -> None:
    cm = bitsmith.compile("smollm2-135m", target="reference", progress=lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory() as out:
        cm.save(out)
        loaded = bitsmith.load(out)  # validated: hashes, tensor table, IR text
        tok = loaded.tokenizer()
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
        new = loaded.generate(ids, max_new_tokens=24, eos_token_id=loaded.lm.eos_token_id)
        print(prompt + tok.decode(new[0, ids.shape[1]:].tolist(), skip_special_tokens=True))
        print({k: v for k, v in loaded.report().items() if k in ("params", "weight_bytes", "bits_per_weight")})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "The capital of France is")
