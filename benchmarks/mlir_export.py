"""`bitsmith export-mlir smollm2-135m` (fp32 and bitmod-w4): time, file size, and how long
MLIR's own parser and verifier take on the file in a fresh context; then `bitsmith
import-mlir` of the same file (weights referenced externally, so it reads no data).

Run from the repository root: ``python benchmarks/mlir_export.py [--out results.txt]``.
The CLI runs as a subprocess, so its time includes loading the GGUF, capture and passes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's bitsmith, as `python -m` uses
from machine import machine_line  # noqa: E402

SCHEMES = (("fp32", []), ("bitmod-w4", ["--quant", "bitmod-w4"]))


def _cli(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bitsmith", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def _export_only(flags: list[str]) -> float:
    """Seconds of the export step alone (Module -> verified MLIR text), in this process."""
    import bitsmith
    options = {"quant": flags[1]} if flags else {}
    module = bitsmith.compile("smollm2-135m", target="reference", **options).module
    start = time.perf_counter()
    bitsmith.export_mlir(module)
    return time.perf_counter() - start


def _parse_and_verify(path: Path) -> tuple[float, float, int]:
    from torch_mlir import ir
    text = path.read_text(encoding="utf-8")
    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        start = time.perf_counter()
        module = ir.Module.parse(text)
        parsed = time.perf_counter()
        module.operation.verify()  # raises MLIRError if the verifier rejects it
        verified = time.perf_counter()
        ops = 0

        def count(op):
            nonlocal ops
            ops += 1
            return ir.WalkResult.ADVANCE

        module.operation.walk(count)
    return parsed - start, verified - parsed, ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/mlir_export.txt")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, flags in SCHEMES:
            mlir = Path(tmp) / f"{scheme}.mlir"
            export_s = _cli(["export-mlir", "smollm2-135m", "-o", str(mlir), *flags])
            only_s = _export_only(flags)
            parse_s, verify_s, ops = _parse_and_verify(mlir)
            import_s = _cli(["import-mlir", str(mlir), "-o", str(Path(tmp) / f"{scheme}.ir")])
            text = mlir.read_text(encoding="utf-8")
            rows.append((scheme, export_s, only_s, mlir.stat().st_size, ops, text.count("bitsmith.qlinear"),
                         text.count("ml_program.global private"), parse_s, verify_s, import_s))
            print(rows[-1], flush=True)
    lines = [f"# bitsmith export-mlir smollm2-135m; machine: {machine_line()}",
             "# export_s: whole CLI run (GGUF load, capture, passes, export, MLIR parse+verify inside);",
             "# only_s: the export step alone (Module -> MLIR text, parsed, tagged and verified by MLIR);",
             "# parse_s / verify_s: MLIR's parser and verifier on the written file in a fresh Context;",
             "# import_s: `bitsmith import-mlir FILE -o OUT.ir` (external weights: no data read).",
             f"{'scheme':<10} {'export_s':>8} {'only_s':>6} {'bytes':>10} {'mlir_ops':>8} {'qlinear':>7} {'globals':>7} "
             f"{'parse_s':>7} {'verify_s':>8} {'import_s':>8}"]
    for scheme, export_s, only_s, size, ops, qlinear, globals_, parse_s, verify_s, import_s in rows:
        lines.append(f"{scheme:<10} {export_s:8.1f} {only_s:6.2f} {size:10,} {ops:8,} {qlinear:7} {globals_:7} "
                     f"{parse_s:7.3f} {verify_s:8.3f} {import_s:8.1f}")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
