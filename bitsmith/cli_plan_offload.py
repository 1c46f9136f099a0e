"""``bitsmith plan-offload``: attention-offloading plans from the cost model (docs/offload-planning.md)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_CONTEXTS = "1024,2048,4096,8192,16384,32768"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_plan_offload(args: argparse.Namespace) -> int:
    from .offload_planning.cost_model import Assumptions
    from .offload_planning.planner import PlanSettings, plan
    from .offload_planning.presets import load_presets
    from .offload_planning.profile import decode_profile
    from .offload_planning.report import markdown_table, plot_tokens_per_dollar, profile_summary, rows_json
    from .offload_planning.roofline import AS_IR, ElementSizes
    from .offload_planning.sources import load_model

    if not 0 < args.memory_utilization <= 1:
        raise ValueError(f"--memory-utilization {args.memory_utilization} must be in (0, 1]")
    presets = load_presets(args.presets)
    compute, memory, link = presets.device(args.compute), presets.device(args.memory), presets.link(args.link)
    name, module = load_model(args.model, progress=_note)
    sizes = AS_IR if args.dtype == "as-ir" else ElementSizes({"fp16": 2, "fp32": 4}[args.dtype])
    profile = decode_profile(module, sizes, name)
    settings = PlanSettings(args.max_group, args.max_attention,
                            Assumptions(args.memory_utilization, stagger=not args.no_stagger))
    rows = plan(profile, compute, memory, link, args.context, args.batch, settings)
    if args.plot:
        plot_tokens_per_dollar({name: rows}, args.plot,
                               f"{name}: {compute.name} + {memory.name} over {link.name} vs {compute.name} only")
    if args.json:
        out: dict[str, Any] = {"model": profile_summary(profile), "compute": vars_of(compute),
                               "memory": vars_of(memory), "link": vars_of(link), "dtype": args.dtype,
                               "stagger": not args.no_stagger, "memory_utilization": args.memory_utilization,
                               "rows": rows_json(rows)}
        print(json.dumps(out, indent=2))
        return 0
    s = profile_summary(profile)
    print(f"{name}: {s['layers']} layers, {s['kv_heads']} KV heads, weights {s['dense_weight_bytes'] / 1e9:.2f} GB, "
          f"KV cache {s['kv_bytes_per_token'] / 1e3:.1f} kB per token, transfer "
          f"{s['bytes_per_token_per_layer']:.0f} B per token per layer ({args.dtype})")
    print(f"compute {compute.name} (${compute.dollars_per_hour}/h), memory {memory.name} "
          f"(${memory.dollars_per_hour}/h), link {link.name}; staggering {'off' if args.no_stagger else 'on'}\n")
    print(markdown_table(rows))
    if s["generic_ops"]:
        print(f"\nops costed by the generic rule (one op per output element): {', '.join(s['generic_ops'])}")
    return 0


def vars_of(preset: Any) -> dict[str, Any]:
    from dataclasses import asdict
    return asdict(preset)


def add_plan_offload_command(sub: Any) -> None:
    p = sub.add_parser("plan-offload", help="plan attention offloading (Lamina) with a roofline cost model")
    p.add_argument("model", metavar="MODEL|DIR", help="a shape name (llama2-7b, llama2-70b, smollm2-135m-shape), "
                   "a LLaMA config.json, an artifact DIR, or a model the frontend loads (smollm2-135m, HF dir, .gguf)")
    p.add_argument("--compute", default="h100-sxm", help="device preset of the dense side (default h100-sxm)")
    p.add_argument("--memory", default="h20", help="device preset of the attention side (default h20)")
    p.add_argument("--link", default="400gbps", help="link preset (default 400gbps)")
    p.add_argument("--presets", metavar="FILE", help="a JSON presets file adding to / replacing the built-in ones")
    p.add_argument("--context", type=_int_list, default=_int_list(DEFAULT_CONTEXTS), metavar="L,L,...",
                   help=f"context lengths (default {DEFAULT_CONTEXTS})")
    p.add_argument("--batch", type=_int_list, metavar="B,B,...",
                   help="batch sizes to plan for (default: the planner chooses, up to what fits)")
    p.add_argument("--dtype", choices=("fp16", "fp32", "as-ir"), default="fp16",
                   help="element size of weights, activations and KV cache (default fp16)")
    p.add_argument("--no-stagger", action="store_true", help="no two-micro-batch staggering")
    p.add_argument("--max-attention", type=int, default=32, metavar="N", help="most attention devices tried (32)")
    p.add_argument("--max-group", type=int, default=8, metavar="N", help="most compute devices tried (8)")
    p.add_argument("--memory-utilization", type=float, default=0.9, metavar="F",
                   help="usable share of each device's memory (default 0.9)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="OUT.png", help="also draw tokens per dollar against context length")
    p.set_defaults(func=cmd_plan_offload)
