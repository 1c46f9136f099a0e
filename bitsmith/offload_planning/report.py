"""The planner's rows as a markdown table, as JSON, and as a chart of tokens per dollar."""

from __future__ import annotations

import os
from typing import Any, Sequence

from .planner import Deployment, PlanRow
from .profile import DecodeProfile, decode_bindings


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _offload_cell(d: Deployment | None) -> list[str]:
    if d is None:
        return ["does not fit", "", "", "", "", ""]
    t = d.times
    return [f"{d.compute_count}x {d.compute} + {d.memory_count}x {d.memory}", str(d.batch),
            _num(d.tokens_per_second), _num(d.tokens_per_dollar),
            f"{t.step * 1e3:.2f} ({t.dense * 1e3:.2f} / {t.attention * 1e3:.2f} / {t.transfer * 1e3:.2f})",
            f"{d.attention_per_compute:g}"]


def _homogeneous_cell(d: Deployment | None) -> list[str]:
    if d is None:
        return ["does not fit", "", "", "", ""]
    return [f"{d.compute_count}x {d.compute}", str(d.batch), _num(d.tokens_per_second), _num(d.tokens_per_dollar),
            f"{d.times.step * 1e3:.2f}"]


def markdown_table(rows: Sequence[PlanRow]) -> str:
    """One line per (context, batch): the chosen offload deployment, the homogeneous one, the ratio."""
    head = ["context", "offload devices", "batch", "tok/s", "tok/$", "step ms (dense / attn / xfer busy)",
            "attn per compute", "homogeneous", "batch", "tok/s", "tok/$", "step ms", "tok/$ ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        cells = [str(r.context)] + _offload_cell(r.offload) + _homogeneous_cell(r.homogeneous) + [ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_summary(profile: DecodeProfile, context: int = 4096) -> dict[str, Any]:
    """The model facts the plan rests on (per sequence, per decode step)."""
    sent, received = profile.transfer_bytes(decode_bindings(1, context))
    return {"model": profile.name, "layers": profile.layers, "kv_heads": profile.kv_heads,
            "dense_weight_bytes": profile.dense_weight_bytes,
            "kv_bytes_per_token": profile.kv_bytes_per_sequence(1),
            "bytes_to_attention_per_token": sent, "bytes_from_attention_per_token": received,
            "bytes_per_token_per_layer": (sent + received) / profile.layers,
            "generic_ops": list(profile.dense.generic_ops + profile.attention.generic_ops)}


def rows_json(rows: Sequence[PlanRow]) -> list[dict[str, Any]]:
    return [{"context": r.context, "batch": r.batch, "ratio": r.ratio,
             "offload": r.offload.as_json() if r.offload else None,
             "homogeneous": r.homogeneous.as_json() if r.homogeneous else None} for r in rows]


def plot_tokens_per_dollar(series: dict[str, Sequence[PlanRow]], out: str | os.PathLike[str], title: str = "") -> None:
    """Tokens per dollar against context length: per series (a label, e.g. a model), the
    offloaded deployment (solid) and the homogeneous one (dashed), log-log."""
    from ..plots import require_pyplot
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    try:
        colors = plt.get_cmap("tab10")
        for i, (label, rows) in enumerate(series.items()):
            for kind, style in (("offload", "-o"), ("homogeneous", "--s")):
                points = [(r.context, getattr(r, kind).tokens_per_dollar) for r in rows if getattr(r, kind)]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=colors(i % 10), label=f"{label} {kind}", markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("tokens per dollar")
        ax.set_title(title or "decode throughput per dollar")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.fspath(out), dpi=120)
    finally:
        plt.close(fig)
