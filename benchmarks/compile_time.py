"""Cold and warm compile time of SmolLM2-135M for tvm-llvm, each in a fresh process.

cold: an empty BITSMITH_CACHE_DIR (no kernels, no converted tokenizer); warm: the same cache
again. Each row runs ``python -m bitsmith compile smollm2-135m --target tvm-llvm --out DIR``
from a repository checkout: ours (this one) and, with ``--baseline REPO``, another checkout
(e.g. the commit before the GGUF loader), alternating baseline/ours so both see the same load.
Reported: wall seconds, CPU seconds of the process tree (user + sys; less sensitive than wall
to other work on a shared machine), the compile's own breakdown line, and the load average.

    python benchmarks/compile_time.py --baseline /path/to/older/checkout --rounds 1
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_line  # noqa: E402

MODEL = "smollm2-135m"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def compile_once(repo: Path, cache: Path, out: Path, quant: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "BITSMITH_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "BITSMITH_TRUST_STORE": str(cache.parent / "trust.json")}
    load = os.getloadavg()[0]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    cmd = [sys.executable, "-m", "bitsmith", "compile", MODEL, "--target", "tvm-llvm", "--out", str(out)]
    done = subprocess.run(cmd + (["--quant", quant] if quant else []), cwd=repo, env=env, capture_output=True,
                          text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if done.returncode:
        raise SystemExit(f"compile in {repo} failed:\n{done.stderr[-2000:]}")
    found = re.search(r"compiled in .*", done.stderr)
    return {"wall": wall, "cpu": cpu, "load": load, "breakdown": found.group(0) if found else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="another checkout to time the same way")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--quant", action="append", default=None,
                   help="a --quant scheme to compile (repeatable; 'none' = the CLI's default); default: none")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compile_time.md")
    args = p.parse_args()
    repos = ([("baseline", args.baseline.resolve())] if args.baseline else []) + [("ours", HERE.parent)]
    rows = []
    quants = [None if q == "none" else q for q in (args.quant or ["none"])]
    with tempfile.TemporaryDirectory(prefix="bitsmith-compile-time-") as tmp:
        for r in range(args.rounds):
            for (label, repo), quant in ((lr, q) for lr in repos for q in quants):
                cache = Path(tmp) / f"{label}-{r}-{quant}" / "cache"
                cache.mkdir(parents=True)
                for kind in ("cold", "warm"):
                    m = compile_once(repo, cache, Path(tmp) / f"{label}-{r}-{quant}" / "out", quant)
                    rows.append({"label": label, "quant": quant or "(default)", "kind": kind, **m})
                    print(f"{label} {quant} {kind}: wall {m['wall']:.1f}s cpu {m['cpu']:.1f}s load {m['load']:.1f} "
                          f"| {m['breakdown']}", file=sys.stderr, flush=True)
    lines = ["# SmolLM2-135M compile time, tvm-llvm, fresh processes", "",
             "cold: empty BITSMITH_CACHE_DIR; warm: the same cache again. CPU = user + sys of the "
             "process tree. `load` = 1-minute load average at the start (a shared machine: wall "
             "time grows with it, CPU time much less).", "",
             "| checkout | --quant | cache | wall s | CPU s | load | compile breakdown (from the CLI) |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['quant']} | {row['kind']} | {row['wall']:.1f} | {row['cpu']:.1f} | {row['load']:.1f} | "
                     f"{row['breakdown']} |")
    lines += ["", f"Machine: {machine_line()}", "",
              f"Command: `python benchmarks/compile_time.py {' '.join(sys.argv[1:])}`", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
