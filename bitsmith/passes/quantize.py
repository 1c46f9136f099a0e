"""Pass ``quantize``: replaces selected ``linear`` nodes by ``qlinear`` nodes on packed weights.

Each selected linear whose weight is a table constant becomes a ``qlinear`` (see
``bitsmith/ir/quantized.py``) whose operands are new constants named after the weight:
``<weight>.codes``, ``.scales`` and, as the scheme and annotations need, ``.zeros``,
``.selectors``, ``.nm_index``, ``.outlier_values``, ``.outlier_cols``, ``.outlier_rowptr``.

It consumes the annotations earlier passes left on the linear:
* ``sparsity="N:M"`` (pass ``sparsify``): only the kept weights are quantized, in groups along
  the kept weights of a row, with their in-block indices stored;
* ``outliers=f`` (pass ``outliers``): the ``ceil(f * weights)`` weights with the largest
  quantization-error impact (SpQR), weighted by the Hessian diagonal when calibrating, are
  stored exactly as fp16 in a CSR side matrix, and their groups are fitted without them.

Weights are rounded to nearest (``calibrate=False``) or with GPTQ error compensation
(``calibrate=True``, Frantar et al. 2023), which needs ``calibration``: a callable
``module -> {linear input value name: statistics with .hessian [K, K] and .column_norms [K]}``
(``quantization.calibration.TextCalibration``). Calibration options: ``act_order`` (columns by
decreasing Hessian diagonal, groups fitted up front; see ``quantization.gptq``), ``damp``
(GPTQ's dampening, a fraction of the mean Hessian diagonal) and ``sequential`` (each layer's
statistics from the already-quantized layers before it, which needs a ``calibration`` with a
``sequential(module, stages, step)`` method; see ``quantization.sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bitsmith.ir import Module, Node
from bitsmith.ir.quant_grids import Scheme, get_scheme

from .base import Pass, register_pass
from .quantization.groups import QuantizedMatrix, quantize_matrix, select_outliers
from .quantization.nm import compress_nm, expand_nm, nm_mask, parse_pattern
from .quantization.pack import operand_roles, qlinear_operands
from .quantization.tied_embedding import PackedWeight, gatherable, share_tied_tables
from .quantization.sites import linear_site, normalize_layers, rewrite_selected_linears, selected_linear_inputs
from .rewrite import Rewriter


def qlinear_attrs(shape: tuple[int, ...], scheme: Scheme, group_size: int, sparsity: str, outliers: float,
                  has_bias: bool) -> dict:
    out_features, in_features = shape
    return {"scheme": scheme.name, "group_size": group_size, "in_features": int(in_features),
            "out_features": int(out_features), "sparsity": sparsity, "outliers": float(outliers),
            "bias": has_bias}


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ runs (see ``quantization.gptq.gptq_quantize_matrix``)."""

    damp: float = 0.01
    act_order: bool = False


def pack_weight(weight: np.ndarray, scheme: Scheme, attrs: dict, stats: object = None,
                gptq: GPTQOptions = GPTQOptions()) -> list[np.ndarray]:
    """The qlinear weight operands of one [out, in] weight, quantized as ``attrs`` say
    (``stats``: calibration statistics of its input for GPTQ; None: round-to-nearest)."""
    w = np.asarray(weight, dtype=np.float32)
    group_size, sparsity, outliers = attrs["group_size"], attrs["sparsity"], attrs["outliers"]
    kept, index, nm = w, None, None
    if sparsity:
        nm = parse_pattern(sparsity)
        kept, index = compress_nm(w, nm_mask(w, *nm), *nm)
    importance = None if stats is None else np.diag(np.asarray(stats.hessian, dtype=np.float64)).copy()
    outlier_kept = select_outliers(kept, scheme, group_size, outliers, importance) if outliers else None
    participates = None if outlier_kept is None else ~outlier_kept
    qm: QuantizedMatrix
    if stats is None:
        qm = quantize_matrix(kept, scheme, group_size, participates)
    else:
        from .quantization.gptq import gptq_quantize_matrix
        qm = gptq_quantize_matrix(kept, np.asarray(stats.hessian, dtype=np.float64), scheme, group_size,
                                  mask=participates, damp=gptq.damp, act_order=gptq.act_order)
    outlier_dense = outlier_kept
    if outlier_kept is not None and nm is not None:
        outlier_dense = expand_nm(outlier_kept, index, *nm, w.shape[1])
    return qlinear_operands(qm, scheme, attrs, outlier_dense, w, index)


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Options: ``scheme`` (one of bitsmith.ir.quant_grids.SCHEMES), ``group_size``, ``layers``
    module-path globs (default: every linear but ``*lm_head``), ``calibrate`` (GPTQ),
    ``calibration`` (the statistics source ``calibrate`` needs), and with ``calibrate``:
    ``sequential``, ``act_order``, ``damp`` (see the module docstring)."""

    name = "quantize"
    idempotent = True  # it rewrites only `linear` nodes, and leaves none it would rewrite again
    scheme: str = ""
    group_size: int = 128
    layers: tuple[str, ...] = ()
    calibrate: bool = False
    calibration: object = field(default=None, compare=False, repr=False)
    sequential: bool = False
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not self.scheme:
            from bitsmith.ir.quant_grids import fitted_schemes
            raise ValueError(f"quantize needs scheme=NAME; valid: {', '.join(fitted_schemes())}")
        if get_scheme(self.scheme).block_size is not None:  # unknown scheme: ValueError listing the valid ones
            raise ValueError(f"quantize: scheme {self.scheme} keeps a file's own quantization and cannot be "
                             f"fitted; compile a .gguf model with quant='gguf' (pass gguf-quantize)")
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ValueError(f"quantize: group_size must be a positive integer, got {self.group_size!r}")
        object.__setattr__(self, "layers", normalize_layers(self.layers))
        needing = [k for k in ("sequential", "act_order") if getattr(self, k)]
        if needing and not self.calibrate:
            raise ValueError(f"quantize: {needing[0]} needs calibrate=true (it is an option of GPTQ calibration)")
        if not 0.0 <= float(self.damp) < 1e3:
            raise ValueError(f"quantize: damp must be >= 0 (a fraction of the mean Hessian diagonal), "
                             f"got {self.damp!r}")

    def apply(self, module: Module) -> Module:
        scheme = get_scheme(self.scheme)
        if self.calibrate and self.calibration is None:
            raise ValueError("quantize{calibrate=true} needs calibration activations "
                             "(e.g. bitsmith.compile(..., calibrate=True, calib_text=FILE))")
        gptq = GPTQOptions(damp=float(self.damp), act_order=bool(self.act_order))
        prefixes: dict[tuple, str] = {}  # a weight shared by several linears is quantized once
        tied: dict[str, PackedWeight] = {}  # weight -> its packing, for embeddings reading the same table

        def rewrite(mod: Module, stats_by_input: dict, only_input: str | None = None) -> Module:
            def quantize_linear(node: Node, rw: Rewriter) -> None:
                if only_input is not None and node.inputs[0] != only_input:
                    return
                self._quantize_linear(node, rw, scheme, stats_by_input, prefixes, gptq, tied)
            return rewrite_selected_linears(mod, self.layers, quantize_linear, "quantize_linear")

        if not self.calibrate:
            return share_tied_tables(rewrite(module, {}), tied)
        if not self.sequential:
            return share_tied_tables(rewrite(module, self.calibration(module)), tied)
        if not callable(getattr(self.calibration, "sequential", None)):
            raise ValueError("quantize{sequential=true} needs a calibration source with a sequential() method "
                             "(bitsmith.passes.quantization.calibration.TextCalibration)")
        stages = selected_linear_inputs(module, self.layers)
        done = self.calibration.sequential(module, stages, lambda mod, value, stats: rewrite(mod, {value: stats}, value))
        return share_tied_tables(done, tied)

    def _quantize_linear(self, node: Node, rw: Rewriter, scheme: Scheme, stats_by_input: dict,
                         prefixes: dict[tuple, str], gptq: GPTQOptions, tied: dict[str, PackedWeight]) -> None:
        site = linear_site(node, rw)
        if site is None:
            return
        sparsity = str(node.attr("sparsity") or "")
        outliers = float(node.attr("outliers") or 0.0)
        stats = None
        if self.calibrate:
            if sparsity:
                raise ValueError(f"linear {site.module_path}: calibrate with N:M sparsity is not supported")
            stats = stats_by_input.get(node.inputs[0])
            if stats is None:
                raise ValueError(f"calibration has no statistics for the input %{node.inputs[0]} "
                                 f"of linear {site.module_path}")
        attrs = qlinear_attrs(site.weight_type.shape, scheme, self.group_size, sparsity, outliers,
                              len(node.inputs) == 3)
        roles = operand_roles(attrs)
        key = (site.weight_name, sparsity, outliers, node.inputs[0] if self.calibrate else None)
        if key not in prefixes:
            try:
                operands = pack_weight(site.weight, scheme, attrs, stats, gptq)
            except ValueError as e:
                raise ValueError(f"linear {site.module_path}: {e}") from None
            prefixes[key] = rw.add_tensors(site.weight_name, {f".{r}": a for r, a in zip(roles, operands)})
            if gatherable(attrs) and not attrs["bias"]:
                tied.setdefault(site.weight_name, PackedWeight(prefixes[key], attrs))
        consts = tuple(rw.constant(f"{prefixes[key]}.{r}", f"{node.output.name}.{r}", site.weight_loc)
                       for r in roles)
        rw.replace(Node("qlinear", (node.inputs[0],) + consts + node.inputs[2:], node.outputs, attrs, node.loc))
