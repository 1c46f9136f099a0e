"""``bitsmith export-mlir`` and ``bitsmith import-mlir``: arguments and what they do."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..ir.printer import print_module
from ..opt import tensors_with_data, write_safetensors
from .options import ATTENTION_FORMS


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="MODEL|DIR", help="a model (name, HF directory, .gguf) or a saved artifact DIR")
    p.add_argument("-o", "--out", required=True, metavar="FILE.mlir", help="MLIR file to write")
    p.add_argument("--inline-weights", action="store_true",
                   help="write every weight into the file as dense data (default: external references "
                        "to the artifact's tensors by name and sha256)")
    p.add_argument("--attention", choices=ATTENTION_FORMS, default="bitsmith",
                   help="bitsmith: keep bitsmith.attention (default); linalg: write it out as contractions")


def add_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE.mlir")
    p.add_argument("-o", "--out", required=True, metavar="FILE", help="bitsmith IR text to write")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tensors", metavar="WEIGHTS.safetensors",
                   help="data of the external constants (checked against their sha256)")
    g.add_argument("--artifact", metavar="DIR", help="take the external constants' data from this artifact")
    p.add_argument("--tensors-out", metavar="FILE.safetensors",
                   help="also write the data of every constant known (inline in the file or given)")


def run_export(args: argparse.Namespace, quant_options: dict[str, Any],
               progress: Callable[[str], None]) -> int:
    from .bindings import ir
    from .interop import export_mlir

    ir()  # a missing extra fails before a capture that can take a minute
    start = time.perf_counter()
    text = export_mlir(args.source, args.out, inline_weights=args.inline_weights, attention=args.attention,
                       progress=progress, **quant_options)
    size = Path(args.out).stat().st_size
    _say(f"wrote {args.out} ({size:,} bytes, {text.count(chr(10)):,} lines; parsed and verified by MLIR) "
         f"in {time.perf_counter() - start:.1f}s")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from .interop import import_mlir

    start = time.perf_counter()
    imported = import_mlir(args.file, args.tensors or args.artifact)
    Path(args.out).write_text(print_module(imported.module), encoding="utf-8")  # lists data-less ones too
    if args.tensors_out:
        write_safetensors(tensors_with_data(imported.module), args.tensors_out)
    nodes = sum(len(f.nodes) for f in imported.module.functions)
    _say(f"wrote {args.out} ({len(imported.module.functions)} functions, {nodes} nodes) in "
         f"{time.perf_counter() - start:.1f}s")
    if imported.missing:
        _say(f"{len(imported.missing)} constants are referenced by name, shape and sha256 only (their data is "
             f"not in the file): pass --tensors or --artifact to attach it")
    return 0
