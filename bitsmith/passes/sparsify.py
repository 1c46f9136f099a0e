"""Pass ``sparsify``: prunes the weights of selected ``linear`` nodes to N:M structured sparsity.

The weight stays a dense fp32 constant (``<weight>.nm<N>_<M>``, zeros where pruned) and the
node gets the attribute ``sparsity="N:M"``; the ``quantize`` pass then stores only the kept
weights plus their in-block indices. Selection keeps, in every block of M consecutive weights
of a row, the N largest ``|W|`` (``method="magnitude"``) or ``|W| * ||X_k||``
(``method="activation"``, Wanda: Sun et al. 2023), ties to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitsmith.ir import Module, Node

from .base import Pass, register_pass
from .quantization.nm import nm_mask, parse_pattern
from .quantization.sites import linear_site, normalize_layers, rewrite_selected_linears
from .rewrite import Rewriter

METHODS = ("magnitude", "activation")


def column_norms_of(stats: object) -> np.ndarray:
    """Per-input-column activation norms from a calibration entry: an array, or an object with
    a ``column_norms`` attribute (the statistics GPTQ calibration collects)."""
    norms = getattr(stats, "column_norms", stats)
    return np.asarray(norms, dtype=np.float64)


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    """Options: ``pattern`` N:M; ``method`` magnitude | activation; ``layers`` module-path globs
    (default: every linear but ``*lm_head``); ``calibration``: a callable ``module -> {input
    value name: column norms}`` that ``method="activation"`` needs."""

    name = "sparsify"
    idempotent = True  # a linear already pruned to the pattern is left alone
    pattern: str = "2:4"
    method: str = "magnitude"
    layers: tuple[str, ...] = ()
    calibration: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.method not in METHODS:
            raise ValueError(f"sparsify: unknown method {self.method!r}; valid: {', '.join(METHODS)}")
        object.__setattr__(self, "layers", normalize_layers(self.layers))

    def apply(self, module: Module) -> Module:
        n, m = parse_pattern(self.pattern)
        norms: dict = {}
        if self.method == "activation":
            if self.calibration is None:
                raise ValueError("sparsify{method=activation} needs calibration activations "
                                 "(a calibration source giving each linear's input column norms)")
            norms = self.calibration(module)
        pruned: dict[tuple, str] = {}  # a weight shared by several linears is pruned once

        def sparsify_linear(node: Node, rw: Rewriter) -> None:
            site = linear_site(node, rw)
            if site is None:
                return
            existing = node.attr("sparsity") or ""
            if existing == self.pattern:
                return  # already pruned to this pattern
            if existing:
                raise ValueError(f"linear {site.module_path or node.output.name} is already {existing} "
                                 f"sparse; cannot re-sparsify to {self.pattern}")
            scale = None
            if self.method == "activation":
                if node.inputs[0] not in norms:
                    raise ValueError(f"calibration has no column norms for the input %{node.inputs[0]} "
                                     f"of linear {site.module_path}")
                scale = column_norms_of(norms[node.inputs[0]])
            suffix = f".nm{n}_{m}"
            key = (site.weight_name, node.inputs[0] if scale is not None else None)
            if key not in pruned:
                w = site.weight
                try:
                    keep = nm_mask(w, n, m, scale)
                except ValueError as e:
                    raise ValueError(f"linear {site.module_path}: {e}") from None
                pruned[key] = rw.add_tensors(site.weight_name, {suffix: np.where(keep, w, np.zeros((), w.dtype))})
            const = rw.constant(pruned[key] + suffix, f"{node.output.name}.w{suffix}", site.weight_loc)
            inputs = (node.inputs[0], const) + node.inputs[2:]
            rw.replace(node.replace(inputs=inputs, attrs={**node.attr_dict, "sparsity": self.pattern}))

        return rewrite_selected_linears(module, self.layers, sparsify_linear, "sparsify_linear")
