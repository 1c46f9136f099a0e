"""``bitsmith serve DIR``: the artifact behind an OpenAI-compatible HTTP API (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serve.app import ServeConfig, create_app
    except ImportError as e:
        raise ValueError(f"`bitsmith serve` needs the serve extra (pip install 'bitsmith[serve]'): {e}") from None
    from .runtime.artifact import load_artifact

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--port", args.port, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("BITSMITH_API_KEY")
    cm = load_artifact(args.artifact, trust_native_code=args.trust_native_code, threads=args.threads)
    if not cm.is_language_model or cm.lm is None or cm.lm.tokenizer_json is None:
        raise ValueError(f"{args.artifact} holds no causal language model with a tokenizer; "
                         "`bitsmith serve` serves text generation only")
    model_id = args.model_id or os.path.basename(os.path.normpath(args.artifact))
    app = create_app(cm, ServeConfig(model_id, api_key, args.max_batch, args.max_queue, args.timeout))
    print(f"bitsmith serve: {model_id} ({cm.target}) on http://{args.host}:{args.port}/v1 "
          f"(max batch {args.max_batch}, queue {args.max_queue}, timeout {args.timeout:g} s, "
          f"KV cache {app.state.engine.stats()['kv_cache']}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def add_serve_command(sub: Any, add_trust_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("serve", help="serve a compiled language model over an OpenAI-compatible HTTP API")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $BITSMITH_API_KEY, else no key)")
    p.add_argument("--model-id", metavar="NAME", help="the model id clients send (default: the directory's name)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="most requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="most requests waiting for a batch slot; beyond it requests get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds a request may take from arrival to its last token (default 600)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU kernel threads (tvm-llvm, lut-cpu; 0: every core; default: as compiled)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_trust_argument(p)
    p.set_defaults(func=cmd_serve)
