"""The command-line side of attention offloading: ``bitsmith compile --offload-attention`` flags
and ``bitsmith run DIR --attention-workers N [--stagger]`` on an offloaded artifact
(docs/attention-offload.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_compile_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attention offloading (docs/attention-offload.md)")
    g.add_argument("--offload-attention", action="store_true",
                   help="split decode into a dense program and an attention program that owns the KV cache")
    g.add_argument("--attention-target", metavar="T", help="target of the attention program (default: --target)")


def compile_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.attention_target and not args.offload_attention:
        raise ValueError("--attention-target needs --offload-attention")
    out: dict[str, Any] = {}
    if args.offload_attention:
        out["offload_attention"] = True
    if args.attention_target:
        out["attention_target"] = args.attention_target
    return out


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloaded artifacts (compiled with --offload-attention)")
    g.add_argument("--attention-workers", type=int, default=0, metavar="N",
                   help="start N attention worker processes on this machine (loopback) holding the KV cache split "
                        "by kv heads (N <= kv heads); under torchrun the workers are ranks 1..N instead")
    g.add_argument("--stagger", action="store_true",
                   help="pipeline two micro-batches so the dense side, the link and the attention side overlap")
    g.add_argument("--offload-timeout", type=float, default=60.0, metavar="S",
                   help="seconds any wait on a worker may take before the run ends with an error (default 60)")
    g.add_argument("--offload-stats", action="store_true",
                   help="print the per-side seconds and bytes moved as JSON on stderr at the end")


def is_offloaded(path: str) -> bool:
    from .runtime.offload.artifact import is_offload_artifact
    return is_offload_artifact(path)


def is_worker_rank() -> bool:
    from .runtime.offload.model import env_rank
    rank = env_rank()
    return rank is not None and rank != 0


def serve(args: argparse.Namespace) -> int:
    """This process is an attention worker of a torchrun job: serve until rank 0 stops."""
    from .runtime.offload.launch import serve_worker
    serve_worker(args.artifact, args.offload_timeout, args.trust_native_code, args.threads)
    return 0


def load(args: argparse.Namespace) -> Any:
    from .runtime.offload.launch import load_offloaded
    if args.attention_workers < 0:
        raise ValueError(f"--attention-workers must be >= 0, got {args.attention_workers}")
    if args.offload_timeout <= 0:
        raise ValueError(f"--offload-timeout must be > 0, got {args.offload_timeout}")
    return load_offloaded(args.artifact, args.attention_workers, args.stagger, args.offload_timeout,
                          args.trust_native_code, args.threads)


def finish(cm: Any, args: argparse.Namespace) -> None:
    stats = cm.close()
    if getattr(args, "offload_stats", False):
        print(json.dumps(stats), file=sys.stderr, flush=True)


def check_plain_run(args: argparse.Namespace) -> None:
    if args.attention_workers or args.stagger:
        raise ValueError(f"{args.artifact} is not an offloaded artifact; --attention-workers and --stagger need one "
                         "compiled with --offload-attention")
