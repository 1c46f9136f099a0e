"""Charts written by the CLI (needs the ``plot`` extra: matplotlib, drawn with the Agg backend)."""

from __future__ import annotations

import os
from typing import Sequence

from .errors import BitsmithError
from .runtime.datatype_usage import LayerDatatypes


class PlotUnavailableError(BitsmithError):
    """matplotlib is not installed."""


def require_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError("--plot needs matplotlib: pip install 'bitsmith[plot]' "
                                   "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt
    return plt


def short_labels(names: Sequence[str]) -> list[str]:
    """Layer paths without their common dotted prefix (``model.layers.``), when one exists."""
    prefix = os.path.commonprefix(list(names)) if len(names) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]
    return [name[len(prefix):] or name for name in names]


def plot_datatype_shares(layers: Sequence[LayerDatatypes], out: str | os.PathLike[str],
                         title: str = "") -> None:
    """A stacked bar per quantized layer: the share of its weight groups using each grid."""
    if not layers:
        raise ValueError("the artifact has no quantized layers (qlinear ops) to plot")
    plt = require_pyplot()
    grids: list[str] = []
    for layer in layers:
        grids.extend(g for g in layer.groups if g not in grids)
    width = max(6.0, 0.12 * len(layers) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 4.5))
    try:
        x = range(len(layers))
        bottom = [0.0] * len(layers)
        colors = plt.get_cmap("tab10")
        for i, grid in enumerate(grids):
            share = [100.0 * layer.shares.get(grid, 0.0) for layer in layers]
            ax.bar(x, share, bottom=bottom, width=0.85, label=grid, color=colors(i % 10))
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_xticks(list(x))
        ax.set_xticklabels(short_labels([layer.layer for layer in layers]), rotation=90, fontsize=6)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of weight groups (%)")
        schemes = sorted({layer.scheme for layer in layers})
        ax.set_title(title or f"datatype chosen per layer ({', '.join(schemes)})")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(out), dpi=120)
    finally:
        plt.close(fig)
