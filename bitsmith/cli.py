"""The ``bitsmith`` command line: targets, compile, run, chat, eval, inspect, trust, opt, bench, export-mlir,
import-mlir.

Every user-facing failure (a BitsmithError, a missing file, a bad value) prints one line,
``bitsmith: error: <message>``, on stderr and exits 2; set BITSMITH_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .bench import add_bench_command
from .cli_generate import add_generation_commands
from .cli_opt import add_opt_command
from .cli_serve import add_serve_command
from .cli_plan_offload import add_plan_offload_command
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


_QUANT_FLAGS = ("quant", "group_size", "outliers", "sparsity", "sparsity_method", "calib_text",
                "calib_sequences", "calib_seq_len", "calib_damp", "calib_target", "head_quant",
                "shiftadd_scale", "shiftadd_iterations", "bits_budget", "shiftadd_offset")
_QUANT_SWITCHES = ("calibrate", "calib_sequential", "act_order")


def _quant_options(args: argparse.Namespace) -> dict[str, Any]:
    """The compression keyword arguments of ``bitsmith.compile`` given on the command line,
    validated now (an unknown scheme fails before a compile that can take a minute)."""
    from .compression import CompressionOptions

    options = {k: getattr(args, k) for k in _QUANT_FLAGS if getattr(args, k) is not None}
    if "shiftadd_offset" in options:
        options["shiftadd_offset"] = options["shiftadd_offset"] == "on"
    options.update({k: True for k in _QUANT_SWITCHES if getattr(args, k)})
    if args.layers:
        options["layers"] = list(args.layers)
    CompressionOptions.from_options(dict(options))
    return options


def _compile_with_progress(model: str, target: str, passes: Sequence[str] | None,
                           options: dict[str, Any]) -> Any:
    """``bitsmith.compile`` with a progress line per step on stderr and a timing summary."""
    import bitsmith

    compile_fn = getattr(bitsmith, "compile", None)
    if compile_fn is None:
        raise BitsmithError("this installation has no bitsmith.compile (the frontend is missing)")
    start = time.perf_counter()

    def step(message: str) -> None:
        _progress(f"[{time.perf_counter() - start:6.1f}s] {message}...")

    cm = compile_fn(model, target=target, passes=passes or None, progress=step, **options)
    phases = cm.timings.get("seconds", {})
    detail = ", ".join(f"{k} {v:.1f}s" for k, v in phases.items() if isinstance(v, (int, float)))
    _progress(f"compiled in {time.perf_counter() - start:.1f}s" + (f" ({detail})" if detail else ""))
    return cm


class _ProgressBar:
    """A one-line ``\r``-updated progress bar on stderr: ``label [#####-----] 3/8 12.1s``."""

    def __init__(self, label: str, width: int = 30) -> None:
        self.label, self.width, self.start = label, width, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.start
        eta = f", eta {elapsed / done * (total - done):.0f}s" if 0 < done < total else ""
        end = "\n" if done >= total else ""
        print(f"\r{self.label} [{bar}] {done}/{total} {elapsed:.1f}s{eta}", end=end, file=sys.stderr,
              flush=True)


# --- subcommands -------------------------------------------------------------------------

def cmd_targets(args: argparse.Namespace) -> int:
    from .backends import targets

    known = targets()
    width = max((len(t) for t in known), default=0)
    for name in sorted(known):
        print(f"{name:<{width}}  {known[name].name}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    options = _parse_options(args.option)
    quant = _quant_options(args)
    clash = sorted(set(options) & set(quant))
    if clash:
        raise ValueError(f"{clash[0]!r} is given both as a flag and as --option; give it once")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # fail before a compile that can take a minute
        raise ValueError(f"--out {args.out} exists and is not a directory")
    from .cli_offload import compile_options
    cm = _compile_with_progress(args.model, args.target, args.passes, {**options, **quant, **compile_options(args)})
    start = time.perf_counter()
    cm.save(args.out)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    _progress(f"saved to {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f}s")
    return 0


def _is_artifact_dir(path: str) -> bool:
    from .runtime.manifest import MANIFEST
    return (Path(path) / MANIFEST).is_file()


def _eval_model(args: argparse.Namespace, quant: dict[str, Any]) -> Any:
    """The compiled model to score: MODEL loaded as an artifact, or compiled with the options."""
    if _is_artifact_dir(args.model):
        if set(quant) - {"quant"} or quant.get("quant", "fp32") not in ("fp32", "none"):
            raise ValueError(f"{args.model} is a compiled artifact: quantization options apply only when "
                             "compiling a model (drop --quant and its options to evaluate it as saved)")
        from .runtime.artifact import load_artifact
        cm = load_artifact(args.model, trust_native_code=args.trust_native_code)
        if args.target is not None and args.target != cm.target:
            raise ValueError(f"{args.model} was compiled for target {cm.target!r}, not {args.target!r}")
        _progress(f"loaded artifact {args.model} (target {cm.target})")
        return cm
    return _compile_with_progress(args.model, args.target or "reference", None, quant)


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from .evaluation import quantization_summary
    from .runtime.perplexity import perplexity

    quant = _quant_options(args)  # an unknown scheme fails here, before loading anything
    text = Path(args.text).read_text(encoding="utf-8")
    if args.ctx < 2 or args.windows < 1:
        raise ValueError(f"need --ctx >= 2 and --windows >= 1, got --ctx {args.ctx} --windows {args.windows}")
    cm = _eval_model(args, quant)
    if not cm.is_language_model:
        raise ValueError(f"{args.model} is no causal language model; `bitsmith eval` scores text")
    start = time.perf_counter()
    ids = np.asarray(cm.tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)
    _progress(f"tokenized {args.text}: {len(ids):,} tokens in {time.perf_counter() - start:.1f}s")
    if len(ids) // args.ctx < args.windows and len(ids) >= args.ctx:
        _progress(f"warning: the text holds only {len(ids) // args.ctx} windows of {args.ctx} tokens; "
                  f"scoring those, not {args.windows}")
    result = perplexity(cm, ids, ctx=args.ctx, windows=args.windows, progress=_ProgressBar("perplexity"))
    summary = quantization_summary(cm)
    record = {"model": args.model, "text": args.text, "target": cm.target, **summary, **result}
    gs = f" g{summary['group_size']}" if summary["group_size"] else ""
    bpw = summary["bits_per_weight"]
    print(f"{args.model} {summary['quant']}{gs} on {Path(args.text).name}: ppl {result['ppl']:.4f} "
          f"({result['windows']} x {result['ctx']} tokens, {result['tokens_scored']:,} scored, "
          f"{result['seconds']:.1f}s), "
          + (f"{bpw:.3f} bits/weight, " if isinstance(bpw, (int, float)) else "")
          + f"{summary['model_bytes'] / 1e6:.1f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        _progress(f"wrote {args.json}")
    return 0


def cmd_export_mlir(args: argparse.Namespace) -> int:
    from .mlir.command import run_export
    from .mlir.sources import is_artifact_dir

    quant = _quant_options(args)
    if quant and is_artifact_dir(args.source):
        raise ValueError(f"{args.source} is a saved artifact: compression flags apply only to a MODEL")
    start = time.perf_counter()
    return run_export(args, quant, lambda m: _progress(f"[{time.perf_counter() - start:6.1f}s] {m}..."))


def cmd_import_mlir(args: argparse.Namespace) -> int:
    from .mlir.command import run_import
    return run_import(args)


def _native_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """{name: {sha256, kind, arch, cpu, features, trusted}} from the manifest and the trust store."""
    from .runtime import trust

    files = trust.native_files(manifest)
    known = trust.trusted() if files else {}
    return {f.name: {"sha256": f.sha256, **f.spec.to_json(), "trusted": f.sha256 in known,
                     "runs_here": not f.spec.missing()} for f in files}


def _inspect_summary(path: str, verify: bool) -> dict[str, Any]:
    from .runtime.artifact import read_manifest, verify_files
    from .runtime.manifest import tensor_bytes

    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    files = {}
    for name, entry in sorted(manifest["files"].items()):
        file = Path(path) / name  # lstat: a link is not the file the manifest lists
        present = os.path.lexists(file) and stat.S_ISREG(os.lstat(file).st_mode)
        files[name] = {"size": entry["size"] if present else None, "sha256": entry["sha256"]}
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
        "native": _native_summary(manifest),
        "verified": verify,
        "compile_info": manifest["compile_info"],
        "target_stats": _target_stats(Path(path), manifest),
    }


def _target_stats(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Statistics a backend left in its target files: any ``target/**.json`` with a top-level
    "stats" object (e.g. the lut backend's stream statistics in target/lut/program.json).
    Each is read like the loader reads it (inside the directory, size- and hash-checked)."""
    from .errors import ArtifactError
    from .runtime.artifact import file_entries
    from .runtime.artifact_files import read_bytes
    out = {}
    for name, entry in file_entries(manifest).items():
        if name.startswith("target/") and name.endswith(".json") and entry.size <= 16 << 20:
            try:
                doc = json.loads(read_bytes(root, name, entry).decode("utf-8"))
            except (ArtifactError, ValueError):
                continue
            if isinstance(doc, dict) and isinstance(doc.get("stats"), dict):
                out[name] = doc["stats"]
    return out


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
    native = s["native"]
    untrusted = sum(not n["trusted"] for n in native.values())
    print(f"native   {len(native)} librar{'y' if len(native) == 1 else 'ies'}"
          + (f", {untrusted} not trusted on this machine (`bitsmith trust {s['path']}`)" if untrusted else
             (", all trusted on this machine" if native else "")))
    specs: dict[str, list[str]] = {}
    for name, n in native.items():
        where = f"{n['kind']} for {n['arch']} {n['cpu']}" + (f" ({' '.join(n['features'])})" if n["features"] else "") \
            + ("" if n["runs_here"] else " [this CPU lacks some of it]")
        specs.setdefault(where, []).append(name)
    for where, names in specs.items():
        print(f"  {len(names)} {where}")
        for name in names:
            print(f"    {name:<{width}}  {'trusted' if native[name]['trusted'] else 'UNTRUSTED'}")
    for name, stats in s.get("target_stats", {}).items():
        print(f"stats    ({name})")
        for key, value in stats.items():
            text = ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else value
            print(f"  {key:<22} {text}")


def _write_datatype_plot(artifact: str, out: str) -> None:
    from .plots import require_pyplot, plot_datatype_shares
    from .runtime.datatype_usage import layer_datatypes

    require_pyplot()  # a missing matplotlib fails before any reading
    layers = layer_datatypes(artifact)
    plot_datatype_shares(layers, out, title=f"datatype chosen per layer: {Path(artifact).name}")
    _progress(f"wrote {out} ({len(layers)} quantized layers)")


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.plot:
        _write_datatype_plot(args.artifact, args.plot)
    summary = _inspect_summary(args.artifact, args.verify)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_inspect_text(summary)
    return 0


def _by_spec(files: list[Any]) -> dict[Any, list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for f in files:
        groups.setdefault(f.spec, []).append(f)
    return groups


def cmd_trust(args: argparse.Namespace) -> int:
    """Shows an artifact's native libraries and, once confirmed, adds their digests to the store."""
    from .runtime import trust
    from .runtime.artifact import read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    files = trust.native_files(manifest)
    if not files:
        print(f"{args.artifact} holds no native code; nothing to trust")
        return 0
    native = {f.name for f in files}  # hash the files now: trust what is on disk, not only what is claimed
    verify_files(args.artifact, {**manifest, "files": {n: e for n, e in manifest["files"].items() if n in native}})
    known = trust.trusted()
    print(f"artifact {args.artifact} (target {manifest['target']}, written by bitsmith "
          f"{manifest['bitsmith_version']}) holds {len(files)} native librar{'y' if len(files) == 1 else 'ies'}:")
    for spec, group in _by_spec(files).items():
        lacks = spec.missing()
        print(f"{len(group)} {spec.kind} built for {spec.describe()}"
              + (f"\n  (this CPU lacks {' '.join(lacks)}: they will not load here)" if lacks else ""))
        for f in group:
            print(f"  {f.name}\n    sha256 {f.sha256}  {'already trusted' if f.sha256 in known else 'new'}")
    new = {f.sha256: f"trusted with `bitsmith trust` from {os.path.abspath(args.artifact)}: {f.name}"
           for f in files if f.sha256 not in known}
    if not new:
        print(f"all are already in the trust store {trust.store_path()}")
        return 0
    print("Native libraries run with your user's rights as soon as the artifact loads.")
    if not args.yes:
        if not sys.stdin.isatty():
            raise BitsmithError("refusing to trust native code without confirmation: stdin is not a terminal "
                                "(pass --yes to confirm non-interactively)")
        answer = input(f"Trust these {len(new)} digests on this machine (adds them to {trust.store_path()})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing trusted")
            return 1
    added = trust.add(new)
    print(f"added {added} digest{'s' if added != 1 else ''} to {trust.store_path()}")
    return 0


# --- entry point -------------------------------------------------------------------------

def _add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-native-code", action="store_true",
                   help="load the artifact's native libraries even if this machine did not build or trust "
                        "them (only for artifacts from a source you would let run code; see `bitsmith trust`)")


def _add_quant_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--quant", metavar="SCHEME", help="fp32 (default: no quantization), rtn-int2/3/4[-sym], "
                                                    "fp3, fp4, bitmod-w3, bitmod-w4, shiftadd-w2/w3/w4/auto "
                                                    "(docs/shiftadd.md), or gguf (a .gguf "
                                                    "model's own blocks, bit-exact)")
    g.add_argument("--group-size", type=int, metavar="G", help="weights per scale group (default 128)")
    g.add_argument("--outliers", type=float, metavar="F", help="fraction kept in fp16, e.g. 0.005")
    g.add_argument("--sparsity", metavar="N:M", help='structured sparsity, e.g. "2:4"')
    g.add_argument("--sparsity-method", metavar="METHOD", help="magnitude or activation")
    g.add_argument("--calibrate", action="store_true", help="GPTQ-style calibration (needs --calib-text)")
    g.add_argument("--calib-text", metavar="FILE", help="calibration text (never the evaluation text)")
    g.add_argument("--calib-sequences", type=int, metavar="N", help="calibration sequences (default 64)")
    g.add_argument("--calib-seq-len", type=int, metavar="L", help="tokens per calibration sequence (default 512)")
    g.add_argument("--calib-sequential", action="store_true",
                   help="each layer's statistics from the already-quantized layers before it (GPTQ order)")
    g.add_argument("--act-order", action="store_true",
                   help="GPTQ columns by decreasing Hessian diagonal (groups fitted up front; needs --calibrate)")
    g.add_argument("--calib-damp", type=float, metavar="F",
                   help="GPTQ dampening, a fraction of the mean Hessian diagonal (default 0.01)")
    g.add_argument("--calib-target", metavar="TARGET",
                   help="where calibration runs the model: auto (default: fastest CPU target), reference, tvm-llvm")
    g.add_argument("--shiftadd-scale", metavar="KIND",
                   help="shiftadd-* scales: pow2 (default; a shift), apot2 (two shifts), fp16 (plain BCQ)")
    g.add_argument("--shiftadd-iterations", type=int, metavar="N",
                   help="shiftadd-* alternating refinement steps (default 10)")
    g.add_argument("--shiftadd-offset", choices=("on", "off"), type=str.lower,
                   help="shiftadd-* (pow2/apot2): a per-group offset so every group keeps a level 0 (default on; off with fp16)")
    g.add_argument("--bits-budget", type=float, metavar="B",
                   help="shiftadd-auto: average bits per weight over the layers, 2 to 4 (default 3.0)")
    g.add_argument("--layers", nargs="+", action="extend", default=[], metavar="GLOB",
                   help="module paths to quantize (globs; default: every linear layer, lm_head as "
                        "--head-quant says; with gguf: every quantized tensor of the file)")
    g.add_argument("--head-quant", choices=("same", "int8", "fp32"),
                   help="lm_head without --layers: rtn-int8 (int8, default), the scheme's width (same) or fp32")


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
    _add_quant_arguments(p)
    from .cli_offload import add_compile_arguments
    add_compile_arguments(p)
    p.set_defaults(func=cmd_compile)

    add_generation_commands(sub, _add_trust_argument)
    add_serve_command(sub, _add_trust_argument)

    p = sub.add_parser("eval", help="perplexity of a compiled (optionally quantized) language model on a text")
    p.add_argument("model", metavar="MODEL", help="a model name, HF directory or .gguf, or an artifact DIR")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--target", help="a target name (default reference; an artifact keeps its own)")
    p.add_argument("--ctx", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--windows", type=int, default=16, help="non-overlapping windows scored (default 16)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to OUT")
    _add_trust_argument(p)
    _add_quant_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="describe an artifact without loading its weights or native code")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (reads, never loads)")
    p.add_argument("--plot", metavar="OUT.png", help="also draw each quantized layer's share of each "
                                                     "datatype (reads only the selector tensors)")
    p.set_defaults(func=cmd_inspect)

    from .mlir.command import add_export_arguments, add_import_arguments

    p = sub.add_parser("export-mlir", help="write a model or artifact as MLIR (func/linalg/tensor + bitsmith ops)")
    add_export_arguments(p)
    _add_quant_arguments(p)
    p.set_defaults(func=cmd_export_mlir)

    p = sub.add_parser("import-mlir", help="read MLIR written by export-mlir back into bitsmith IR text")
    add_import_arguments(p)
    p.set_defaults(func=cmd_import_mlir)

    p = sub.add_parser("trust", help="show an artifact's native libraries and trust them on this machine")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--yes", action="store_true", help="trust without asking (needed when stdin is not a terminal)")
    p.set_defaults(func=cmd_trust)

    add_opt_command(sub)
    add_bench_command(sub)
    add_plan_offload_command(sub)
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
