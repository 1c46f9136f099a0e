"""What an evaluation reports about the compiled model it scored: scheme, group size, bits per
weight, stored bytes and quantization time.

Shared by ``bitsmith eval`` and ``benchmarks/quality.py`` so both report the same fields.
"""

from __future__ import annotations

import collections
from typing import Any

UNQUANTIZED = "fp32"
# Passes whose time counts as "quantize time" (calibration runs inside them or beside them).
QUANTIZE_PASSES = ("quantize", "outliers", "sparsify", "shiftadd")


def qlinear_attrs(cm: Any) -> list[dict[str, Any]]:
    """Attributes of every quantized linear; a bcq_linear's "scheme" is its label (shiftadd-w3)."""
    from .ir.bcq import OP as BCQ, quant_label
    return [n.attr_dict if n.op == "qlinear" else {**n.attr_dict, "scheme": quant_label(n.attr_dict)}
            for f in cm.module.functions for n in f.nodes if n.op in ("qlinear", BCQ)]


def _common(values: list[Any]) -> Any:
    """The single value of a list, the most common one when they differ, None when empty."""
    if not values:
        return None
    return collections.Counter(values).most_common(1)[0][0]


def quantize_seconds(report: dict[str, Any]) -> float | None:
    """Seconds spent quantizing: the quantization passes plus any calibration step; None for
    a loaded artifact (artifacts hold no timings: they are byte-identical across compiles)."""
    if "pass_seconds" not in report:
        return None
    passes = report.get("pass_seconds", {}) or {}
    phases = report.get("compile_seconds", {}) or {}
    total = sum(v for k, v in passes.items() if k in QUANTIZE_PASSES or "calib" in k)
    total += sum(v for k, v in phases.items() if "calib" in k and k not in passes)
    return float(total)


def quantization_summary(cm: Any) -> dict[str, Any]:
    """{quant, group_size, bits_per_weight, model_bytes, quantized_layers, quantize_seconds,
    pass_seconds, compile_seconds} of a compiled (or loaded) model.

    ``quant`` and ``group_size`` are read from the qlinear ops themselves, so a loaded
    artifact reports what it holds; its ``quantize_seconds``, ``pass_seconds`` and
    ``compile_seconds`` are None (only a compile in this process has timings). Falls back to
    the pre-quantization report fields (``weight_bytes``) where ``report()`` lacks ``model_bytes``.
    """
    report = cm.report()
    attrs = qlinear_attrs(cm)
    quant = _common([a["scheme"] for a in attrs]) or UNQUANTIZED
    model_bytes = report.get("model_bytes", report.get("weight_bytes"))
    return {
        "quant": quant,
        "group_size": _common([a["group_size"] for a in attrs]),
        "bits_per_weight": report.get("bits_per_weight"),
        "model_bytes": model_bytes,
        "quantized_layers": report.get("quantized_layers", len(attrs)),
        "quantize_seconds": quantize_seconds(report),
        "pass_seconds": report.get("pass_seconds"),
        "compile_seconds": report.get("compile_seconds"),
    }
