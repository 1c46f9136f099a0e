"""Pass ``shiftadd``: replaces selected ``linear`` nodes by ``bcq_linear`` nodes (ShiftAddLLM,
You et al., NeurIPS 2024): binary-coded weights with power-of-two (or APoT, or fp16) scales.

The numerics are ``quantization.bcq_fit.fit_bcq`` (greedy initialisation, alternating
refinement, and with calibration the GPTQ-style column loop on the layer's Hessian); this pass
picks the layers, the bits per layer and stores the fit as the op's operands
(``<weight>.planes`` and ``<weight>.exponents`` or ``.alphas``; see ``bitsmith/ir/bcq.py``).

Bits per layer (``bits="auto"``, from ``bitsmith.compile(quant="shiftadd-auto", bits_budget=B)``):
every selected layer is fitted at 2, 3 and 4 bits; its sensitivity at ``b`` bits is the output
error ``E_l(b) = tr(D H D^T)`` of ``D = W - W_b`` (H: the calibration Hessian of the layer's
input, the identity without calibration: the squared reconstruction error). Starting from 4
bits everywhere, the greedy loop lowers by one bit the layer whose error grows least per bit
saved, ``(E_l(b-1) - E_l(b)) / weights_l``, until the average planes per weight (weighted by
each layer's weight count; scales not counted) is at most the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitsmith.ir import Module, Node
from bitsmith.ir.bcq import OP, SCALE_KINDS, ZERO_EXPONENT, alphas, check_scales, operand_types, pack_planes

from .base import Pass, register_pass
from .quantization.sites import linear_site, normalize_layers, rewrite_selected_linears, selected_linear_inputs
from .rewrite import Rewriter

AUTO_BITS = (2, 3, 4)  # the widths shiftadd-auto chooses from


def bcq_operands(fit: Any, attrs: dict) -> list[np.ndarray]:
    """The planes, scales (and offsets) operands of one fit (``bcq_fit.BCQFit``), checked against
    the op's types and, for pow2/apot2, against the alphas the fit used (no silent re-rounding)."""
    planes = pack_planes(fit.signs)
    if attrs["scale"] == "fp16":
        scales = np.asarray(fit.alphas).astype(np.float16)
    else:
        scales = np.asarray(fit.exponents).astype(np.int8)
        used = np.asarray(fit.alphas, dtype=np.float32)
        if not np.array_equal(alphas(attrs, scales).astype(np.float32), used):
            raise ValueError(f"bcq fit: exponents do not reproduce the fit's alphas ({attrs['scale']})")
    check_scales(attrs, scales)
    operands = [planes, scales]
    if attrs.get("offset", False):
        operands.append(np.asarray(fit.offset_units).astype(np.int8))
    for (role, want), got in zip(operand_types(attrs), operands):
        if (tuple(got.shape), str(got.dtype)) != (tuple(want.shape), want.dtype):
            raise ValueError(f"{OP} operand {role}: {got.dtype}{list(got.shape)} != {want}")
    return operands


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray | None) -> float:
    """tr(D H D^T) with D = weight - approx (H = identity when None)."""
    d = np.asarray(weight, dtype=np.float64) - np.asarray(approx, dtype=np.float64)
    if hessian is None:
        return float((d * d).sum())
    return float(np.einsum("nk,kj,nj->", d, np.asarray(hessian, dtype=np.float64), d))


def allocate_bits(errors: dict[str, dict[int, float]], sizes: dict[str, int], budget: float) -> dict[str, int]:
    """Greedy allocation (see the module docstring): layer -> bits in AUTO_BITS with the
    weight-weighted average bits <= ``budget``. Deterministic: ties go to the first layer."""
    lo, hi = AUTO_BITS[0], AUTO_BITS[-1]
    if not lo <= budget <= hi:
        raise ValueError(f"shiftadd: bits_budget must lie in [{lo}, {hi}], got {budget}")
    bits = {name: hi for name in errors}
    total = sum(sizes.values())
    used = sum(hi * sizes[n] for n in bits)
    while total and used > budget * total + 1e-9:
        best, best_cost = None, None
        for name, b in bits.items():
            if b > lo:
                cost = (errors[name][b - 1] - errors[name][b]) / sizes[name]
                if best_cost is None or cost < best_cost:
                    best, best_cost = name, cost
        if best is None:
            break
        bits[best] -= 1
        used -= sizes[best]
    return bits


@register_pass
@dataclass(frozen=True)
class ShiftAdd(Pass):
    """Options: ``bits`` (2, 3, 4 or "auto"), ``group_size`` (weights per scale group along a
    row, default 128), ``scale`` (pow2 | apot2 | fp16), ``offset`` (pow2/apot2: a per-group
    offset, a multiple of the last plane's scale, so every group keeps a level 0; the op's
    ``offsets`` operand), ``iterations`` (alternating refinement steps), ``bits_budget`` (average bits for bits="auto", default 3.0), ``layers`` (module-path
    globs; default every linear but ``*lm_head``), ``calibrate`` with ``calibration`` (a source of
    Hessians, as for ``quantize``), and with calibrate ``sequential``, ``act_order``, ``damp``."""

    name = "shiftadd"
    idempotent = True  # it rewrites only `linear` nodes and leaves none it would rewrite again
    bits: Any = 3
    group_size: int = 128
    scale: str = "pow2"
    offset: bool = False
    iterations: int = 10
    bits_budget: float = 3.0
    layers: tuple[str, ...] = ()
    calibrate: bool = False
    calibration: object = field(default=None, compare=False, repr=False)
    sequential: bool = False
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.bits != "auto" and (isinstance(self.bits, bool) or self.bits not in AUTO_BITS):
            raise ValueError(f"shiftadd: bits must be 2, 3, 4 or 'auto', got {self.bits!r}")
        if self.scale not in SCALE_KINDS:
            raise ValueError(f"shiftadd: scale must be one of {', '.join(SCALE_KINDS)}, got {self.scale!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"shiftadd: group_size must be a positive integer, got {self.group_size!r}")
        if not isinstance(self.offset, bool):
            raise ValueError(f"shiftadd: offset must be true or false, got {self.offset!r}")
        if self.offset and self.scale == "fp16":
            raise ValueError("shiftadd: offset needs scale pow2 or apot2 (fp16 is the plain-BCQ ablation)")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"shiftadd: iterations must be an integer >= 0, got {self.iterations!r}")
        if self.bits == "auto":
            allocate_bits({}, {}, float(self.bits_budget))  # range check only
        object.__setattr__(self, "layers", normalize_layers(self.layers))
        needing = [k for k in ("sequential", "act_order") if getattr(self, k)]
        if needing and not self.calibrate:
            raise ValueError(f"shiftadd: {needing[0]} needs calibrate=true")
        if self.sequential and self.bits == "auto":
            raise ValueError("shiftadd: bits='auto' with sequential calibration is not supported (the allocation "
                             "needs every layer's error before any layer is quantized); drop calib_sequential")
        if not 0.0 <= float(self.damp) < 1e3:
            raise ValueError(f"shiftadd: damp must be >= 0, got {self.damp!r}")

    # ------------------------------------------------------------ fitting

    def _fit(self, weight: np.ndarray, bits: int, stats: object) -> Any:
        from .quantization.bcq_fit import fit_bcq
        hessian = None if stats is None else np.asarray(stats.hessian, dtype=np.float64)
        return fit_bcq(np.asarray(weight, dtype=np.float32), bits, group_size=self.group_size, scale=self.scale,
                       iterations=self.iterations, hessian=hessian, damp=float(self.damp),
                       act_order=bool(self.act_order), offset=self.offset)

    def apply(self, module: Module) -> Module:
        if self.calibrate and self.calibration is None:
            raise ValueError("shiftadd{calibrate=true} needs calibration activations "
                             "(e.g. bitsmith.compile(..., calibrate=True, calib_text=FILE))")
        fits: dict[tuple, Any] = {}  # (weight, input or None, bits) -> fit; a shared weight is fitted once
        prefixes: dict[tuple, str] = {}

        def rewrite(mod: Module, stats_by_input: dict, plan: dict[str, int] | None,
                    only_input: str | None = None) -> Module:
            def fit_linear(node: Node, rw: Rewriter) -> None:
                if only_input is None or node.inputs[0] == only_input:
                    self._rewrite_linear(node, rw, stats_by_input, plan, fits, prefixes)
            return rewrite_selected_linears(mod, self.layers, fit_linear, "shiftadd_linear")

        stats_by_input = self.calibration(module) if self.calibrate and not self.sequential else {}
        plan = self._allocate(module, stats_by_input, fits) if self.bits == "auto" else None
        if not self.sequential:
            return rewrite(module, stats_by_input, plan)
        if not callable(getattr(self.calibration, "sequential", None)):
            raise ValueError("shiftadd{sequential=true} needs a calibration source with a sequential() method")
        stages = selected_linear_inputs(module, self.layers)
        return self.calibration.sequential(module, stages, lambda mod, value, stats: rewrite(mod, {value: stats},
                                                                                             plan, value))

    def _stats(self, node: Node, path: str, stats_by_input: dict) -> object:
        if not self.calibrate:
            return None
        stats = stats_by_input.get(node.inputs[0])
        if stats is None:
            raise ValueError(f"calibration has no statistics for the input %{node.inputs[0]} of linear {path}")
        return stats

    def _fit_cached(self, site: Any, node: Node, bits: int, stats: object, fits: dict) -> Any:
        key = (site.weight_name, node.inputs[0] if self.calibrate else None, bits)
        if key not in fits:
            try:
                fits[key] = self._fit(site.weight, bits, stats)
            except ValueError as e:
                raise ValueError(f"linear {site.module_path}: {e}") from None
        return fits[key]

    def _allocate(self, module: Module, stats_by_input: dict, fits: dict) -> dict[str, int]:
        """Layer key (module path or weight name) -> bits, by the greedy rule of the module doc."""
        errors: dict[str, dict[int, float]] = {}
        sizes: dict[str, int] = {}

        def measure(node: Node, rw: Rewriter) -> None:
            site = linear_site(node, rw)
            if site is None or node.attr("sparsity") or node.attr("outliers"):
                return
            stats = self._stats(node, site.module_path, stats_by_input)
            hessian = None if stats is None else stats.hessian
            key = _layer_key(site)
            errors[key] = {b: output_error(site.weight, self._fit_cached(site, node, b, stats, fits).reconstruct(),
                                           hessian) for b in AUTO_BITS}
            sizes[key] = int(np.prod(site.weight_type.shape))

        rewrite_selected_linears(module, self.layers, measure, "shiftadd_measure")
        return allocate_bits(errors, sizes, float(self.bits_budget))

    def _rewrite_linear(self, node: Node, rw: Rewriter, stats_by_input: dict, plan: dict[str, int] | None,
                        fits: dict, prefixes: dict) -> None:
        site = linear_site(node, rw)
        if site is None:
            return
        if node.attr("sparsity") or node.attr("outliers"):
            raise ValueError(f"linear {site.module_path}: shiftadd does not combine with N:M sparsity or outliers")
        bits = plan[_layer_key(site)] if plan is not None else int(self.bits)
        stats = self._stats(node, site.module_path, stats_by_input)
        out_features, in_features = site.weight_type.shape
        attrs = {"bits": bits, "group_size": self.group_size, "in_features": int(in_features),
                 "out_features": int(out_features), "scale": self.scale, "bias": len(node.inputs) == 3}
        if self.offset:
            attrs["offset"] = True
        roles = [r for r, _ in operand_types(attrs)]
        key = (site.weight_name, node.inputs[0] if self.calibrate else None, bits)
        if key not in prefixes:
            operands = bcq_operands(self._fit_cached(site, node, bits, stats, fits), attrs)
            prefixes[key] = rw.add_tensors(site.weight_name, {f".{r}": a for r, a in zip(roles, operands)})
        consts = tuple(rw.constant(f"{prefixes[key]}.{r}", f"{node.output.name}.{r}", site.weight_loc)
                       for r in roles)
        rw.replace(Node(OP, (node.inputs[0],) + consts + node.inputs[2:], node.outputs, attrs, node.loc))


def _layer_key(site: Any) -> str:
    return site.module_path or site.weight_name


__all__ = ["AUTO_BITS", "ShiftAdd", "ZERO_EXPONENT", "allocate_bits", "bcq_operands", "output_error"]
