"""Rank 0 of an offloaded run, as a separate process (the tests keep torch.distributed out of the
pytest process): ``python tests/offload_rank0.py DIR WORKERS STAGGER IDS_JSON NEW OUT.npz``
writes the greedy tokens, the prompt's logits and the engine's figures (JSON) to OUT.npz."""

from __future__ import annotations

import json
import sys

import numpy as np


def main() -> None:
    path, workers, stagger, ids, new, out = sys.argv[1:7]
    from bitsmith.runtime.offload.launch import load_offloaded
    model = load_offloaded(path, attention_workers=int(workers), stagger=stagger == "1", timeout=60.0)
    prompt = np.asarray(json.loads(ids), dtype=np.int64)
    logits = np.asarray(model(prompt))
    tokens = np.asarray(model.generate(prompt, int(new)))
    stats = model.close()
    np.savez(out, tokens=tokens, logits=logits, stats=np.frombuffer(json.dumps(stats).encode(), dtype=np.uint8))


if __name__ == "__main__":
    main()
