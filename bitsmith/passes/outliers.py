"""Pass ``outliers``: marks selected ``linear`` nodes to keep a fraction of their weights in fp16.

This pass only annotates (``outliers=fraction`` on the node); the ``quantize`` pass does the
extraction, because which weights are outliers depends on the quantization scheme: it keeps the
``ceil(fraction * weights)`` weights with the largest quantization-error impact (SpQR,
Dettmers et al. 2023) as an fp16 CSR side matrix and re-fits their groups without them.
Running ``outliers`` after ``quantize`` finds no ``linear`` left to mark.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Module, Node

from .base import Pass, register_pass
from .quantization.sites import linear_site, normalize_layers, rewrite_selected_linears
from .rewrite import Rewriter


@register_pass
@dataclass(frozen=True)
class MarkOutliers(Pass):
    """Options: ``fraction`` of each layer's weights kept in fp16 (0.005 = 0.5%, 0 removes the
    mark); ``layers`` module-path globs (default: every linear but ``*lm_head``)."""

    name = "outliers"
    idempotent = True
    fraction: float = 0.005
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"outliers: fraction must be in [0, 1), got {self.fraction}")
        object.__setattr__(self, "fraction", float(self.fraction))
        object.__setattr__(self, "layers", normalize_layers(self.layers))

    def apply(self, module: Module) -> Module:
        def mark(node: Node, rw: Rewriter) -> None:
            if linear_site(node, rw) is None:
                return
            attrs = {k: v for k, v in node.attrs if k != "outliers"}
            if self.fraction:
                attrs["outliers"] = self.fraction
            rw.replace(node.replace(attrs=attrs))  # the same attributes again change nothing

        return rewrite_selected_linears(module, self.layers, mark, "mark_outliers")
