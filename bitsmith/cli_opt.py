"""``bitsmith opt``: read IR text, run passes, print IR text (see docs/opt.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _note(message: str) -> None:
    print(f"bitsmith opt: {message}", file=sys.stderr, flush=True)


def _read_text(file: str) -> str:
    return sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")


def tensors_path_for(out: str) -> Path:
    """Where the data of ``--out FILE`` goes: FILE with the suffix ``.safetensors``."""
    path = Path(out)
    target = path.with_suffix(".safetensors")
    if target == path:
        raise ValueError(f"--out {out} ends in .safetensors: that name is kept for the data; use e.g. OUT.ir")
    return target


def _report_data(args: argparse.Namespace, before, after) -> None:
    """Writes the output's tensor data next to --out when the passes created constants."""
    from .opt import new_constants, tensors_with_data, write_safetensors

    new = new_constants(before, after)
    if not new:
        return
    shown = ", ".join(new[:4]) + (f" and {len(new) - 4} more" if len(new) > 4 else "")
    if args.out is None:
        _note(f"the passes created {len(new)} constant(s) ({shown}); their data was not written "
              f"(give --out FILE to write it to FILE with the suffix .safetensors)")
        return
    arrays = tensors_with_data(after)
    target = tensors_path_for(args.out)
    write_safetensors(arrays, target)
    missing = len(after.tensors) - len(arrays)
    _note(f"wrote the data of {len(arrays)} constant(s), {len(new)} of them new, to {target}"
          + (f"; {missing} constant(s) known by hash only are not in it" if missing else ""))


def cmd_opt(args: argparse.Namespace) -> int:
    from .ir import print_module
    from .ir.declared_tensors import DeclaredTensorTable
    from .opt import describe_passes, load_module, run_pipeline

    if args.list_passes:
        sys.stdout.write(describe_passes())
        return 0
    if args.file is None:
        raise ValueError("give an IR FILE (or - for stdin), or --list-passes")
    if args.out is not None:
        tensors_path_for(args.out)  # a bad --out fails before the passes run
    spec = ",".join(args.passes)
    before = load_module(_read_text(args.file), args.tensors)
    declared = before.tensors.declared() if isinstance(before.tensors, DeclaredTensorTable) else ()
    if args.tensors is not None and declared:
        _note(f"{len(declared)} of {len(before.tensors)} constant(s) are not in {args.tensors} "
              f"(e.g. {declared[0].name!r}); they stay known by shape and hash only")
    after = run_pipeline(before, spec, print_after_all=args.print_after_all)
    text = print_module(after)
    if args.out is None:
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
    _report_data(args, before, after)
    return 0


def add_opt_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("opt", help="run passes on IR text (like mlir-opt)",
                       description="Reads IR text, runs passes (verifying after each), prints IR text.")
    p.add_argument("file", nargs="?", metavar="FILE", help="IR text as print_module writes it; - reads stdin")
    p.add_argument("-p", "--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help='passes to run, e.g. "cse,fold{max_elements=64}" (repeatable, run in order)')
    p.add_argument("--tensors", metavar="WEIGHTS.safetensors",
                   help="the constants' data (each checked against the sha256 in the text); without it "
                        "constants are known by shape and hash only")
    p.add_argument("-o", "--out", metavar="FILE", help="write the IR here (default stdout); new constants' "
                                                       "data goes to FILE with the suffix .safetensors")
    p.add_argument("--print-after-all", action="store_true", help="print the IR after each pass to stderr")
    p.add_argument("--list-passes", action="store_true", help="list the registered passes and their options")
    p.set_defaults(func=cmd_opt)
