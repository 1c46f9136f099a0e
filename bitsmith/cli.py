"""The ``bitsmith`` command line: targets, compile, run, inspect.

Every user-facing failure (a BitsmithError, a missing file, a bad value) prints one line,
``bitsmith: error: <message>``, on stderr and exits 2; set BITSMITH_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import BitsmithError

EXIT_USAGE = 2


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _option_value(text: str) -> Any:
    """``--option`` values read as JSON when they are JSON (4, 0.5, true, null, [1,2]), else as text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r} is not KEY=VALUE")
        options[key.strip()] = _option_value(value)
    return options


# --- subcommands -------------------------------------------------------------------------

def cmd_targets(args: argparse.Namespace) -> int:
    from .backends import targets

    known = targets()
    width = max((len(t) for t in known), default=0)
    for name in sorted(known):
        print(f"{name:<{width}}  {known[name].name}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import bitsmith

    options = _parse_options(args.option)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # fail before a compile that can take a minute
        raise ValueError(f"--out {args.out} exists and is not a directory")
    compile_fn = getattr(bitsmith, "compile", None)
    if compile_fn is None:
        raise BitsmithError("this installation has no bitsmith.compile (the frontend is missing)")
    start = time.perf_counter()

    def step(message: str) -> None:
        _progress(f"[{time.perf_counter() - start:6.1f}s] {message}...")

    cm = compile_fn(args.model, target=args.target, passes=args.passes or None, progress=step, **options)
    phases = cm.compile_info.get("seconds", {}) if isinstance(cm.compile_info, dict) else {}
    detail = ", ".join(f"{k} {v:.1f}s" for k, v in phases.items() if isinstance(v, (int, float)))
    _progress(f"compiled in {time.perf_counter() - start:.1f}s" + (f" ({detail})" if detail else ""))
    start = time.perf_counter()
    cm.save(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    _progress(f"saved to {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .runtime.artifact import load_artifact

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    cm = load_artifact(args.artifact)
    if not cm.is_language_model:
        raise ValueError(f"{args.artifact} holds no causal language model (module kind "
                         f"{cm.module.attr('kind')!r}); `bitsmith run` generates text only")
    tokenizer = cm.tokenizer()
    ids = tokenizer.encode(args.prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = cm.lm.eos_token_id if cm.lm is not None else None
    out = cm.generate(np.asarray([ids], dtype=np.int64), max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    new_ids = [int(t) for t in np.asarray(out)[0, len(ids):]]
    print(tokenizer.decode(new_ids, skip_special_tokens=True))
    return 0


def _inspect_summary(path: str, verify: bool) -> dict[str, Any]:
    from .runtime.artifact import read_manifest, verify_files
    from .runtime.manifest import tensor_bytes

    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    files = {}
    for name, digest in sorted(manifest["files"].items()):
        file = Path(path) / name
        files[name] = {"size": file.stat().st_size if file.is_file() else None, "sha256": digest}
    return {
        "path": str(path),
        "format_version": manifest["format_version"],
        "bitsmith_version": manifest["bitsmith_version"],
        "target": manifest["target"],
        "backend": manifest["backend"],
        "options": manifest["options"],
        "module_attrs": manifest["module_attrs"],
        "language_model": manifest["language_model"],
        "tensors": {"count": len(manifest["tensors"]), "bytes": tensor_bytes(manifest)},
        "op_counts": manifest["op_counts"],
        "files": files,
        "verified": verify,
        "compile_info": manifest["compile_info"],
    }


def _print_inspect_text(s: dict[str, Any]) -> None:
    rows = [
        ("artifact", s["path"]),
        ("format", f"{s['format_version']} (written by bitsmith {s['bitsmith_version']})"),
        ("target", f"{s['target']} (backend {s['backend']})"),
        ("options", json.dumps(s["options"], sort_keys=True)),
        ("module", ", ".join(f"{k}={json.dumps(v)}" for k, v in s["module_attrs"].items()) or "-"),
    ]
    lm = s["language_model"]
    if lm is not None:
        rows.append(("language", f"bos {lm['bos_token_id']}, eos {lm['eos_token_id']}, "
                                 f"tokenizer {'yes' if lm['has_tokenizer'] else 'no'}"))
    rows.append(("tensors", f"{s['tensors']['count']} ({s['tensors']['bytes']:,} bytes)"))
    rows.append(("ops", ", ".join(f"{op} {n}" for op, n in s["op_counts"].items()) or "-"))
    for key, value in rows:
        print(f"{key:<9} {value}")
    print("files" + ("    (sha256 verified)" if s["verified"] else ""))
    width = max((len(n) for n in s["files"]), default=0)
    for name, f in s["files"].items():
        size = "missing" if f["size"] is None else f"{f['size']:,} bytes"
        print(f"  {name:<{width}}  {size:>16}  sha256 {f['sha256'][:16]}")


def cmd_inspect(args: argparse.Namespace) -> int:
    summary = _inspect_summary(args.artifact, args.verify)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_inspect_text(summary)
    return 0


# --- entry point -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsmith", description="Compile LLMs into deployable artifacts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("targets", help="list the implemented targets and their backends")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("compile", help="compile a model into an artifact directory")
    p.add_argument("model", metavar="MODEL", help="a Hugging Face model name or directory")
    p.add_argument("--target", required=True, help="a target name (see `bitsmith targets`)")
    p.add_argument("--out", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help='a pass spec, e.g. "cse,fold{max_elements=64}" (repeatable)')
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a compile option; VALUE is read as JSON when it parses (repeatable)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="generate text with a compiled language model")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt", required=True, help="raw prompt text (no special tokens are added)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", help="describe an artifact without loading its weights or native code")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads, never loads)")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse prints usage and exits 2 on its own errors
    try:
        return args.func(args)
    except (BitsmithError, OSError, ValueError) as e:
        if os.environ.get("BITSMITH_DEBUG"):
            raise
        print(f"bitsmith: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bitsmith: interrupted", file=sys.stderr)
        return 130
