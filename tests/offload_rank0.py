"""Rank 0 of an offloaded run, as a separate process (the tests keep torch.distributed out of the
pytest process): ``python tests/offload_rank0.py DIR WORKERS STAGGER IDS_JSON NEW OUT.npz``
writes the greedy tokens, the prompt's logits and the engine's figures (JSON) to OUT.npz."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment of a child process that imports this checkout's bitsmith."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_rank0(path: Path, workers: int, stagger: bool, prompts: list, new: int, out: Path,
              timeout: float = 600, loads: int = 1) -> tuple[np.ndarray, np.ndarray, dict]:
    """Runs this script in a child process; returns (tokens, prompt logits, engine figures) of
    the last of ``loads`` loads (each closed before the next) in that one process."""
    subprocess.run([sys.executable, __file__, str(path), str(workers), str(int(stagger)), json.dumps(prompts),
                    str(new), str(out), str(loads)], check=True, env=child_env(), timeout=timeout)
    data = np.load(out)
    return data["tokens"], data["logits"], json.loads(bytes(data["stats"]).decode())


def main() -> None:
    path, workers, stagger, ids, new, out = sys.argv[1:7]
    loads = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    from bitsmith.runtime.offload.launch import load_offloaded
    prompt = np.asarray(json.loads(ids), dtype=np.int64)
    for _ in range(loads):
        model = load_offloaded(path, attention_workers=int(workers), stagger=stagger == "1", timeout=60.0)
        logits = np.asarray(model(prompt))
        tokens = np.asarray(model.generate(prompt, int(new)))
        stats = model.close()
    np.savez(out, tokens=tokens, logits=logits, stats=np.frombuffer(json.dumps(stats).encode(), dtype=np.uint8))


if __name__ == "__main__":
    main()
