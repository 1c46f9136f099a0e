"""Pass ``gguf-quantize``: every selected ``linear`` whose weight came from a quantized GGUF
tensor becomes a ``qlinear`` holding that tensor's own blocks, bit-exactly (scheme
``gguf-<type>``, see ``bitsmith/ir/gguf_schemes.py``). Nothing is re-quantized: codes, scales
and minimums are the file's, so the weights the compiled model computes with are exactly the
ones llama.cpp computes with.

Options: ``layers`` (module-path globs as for ``quantize``; default every linear, the tied
``lm_head`` included, since the file stores it quantized) and ``source``: where the blocks
come from, either a mapping {tensor-table name: ``bitsmith.gguf.QuantizedRows``} (the frontend
hands over what it decoded while loading the model, rows already in HF order) or the path of
a .gguf file whose tensor names are the module's tensor names (``bitsmith opt``, tests).

A weight whose source does not dequantize to exactly the module's float weight is refused
(the wrong file, or a name mapping gone wrong), so a model is never silently computed with
other weights than the ones it was captured with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from bitsmith.gguf import BlockFormat, QuantizedRows, decode_rows, format_of, open_gguf
from bitsmith.ir import Module, Node
from bitsmith.ir.code_packing import pack_codes
from bitsmith.ir.quant_grids import get_scheme

from .base import Pass, register_pass
from .quantize import qlinear_attrs
from .quantization.pack import operand_roles
from .quantization.tied_embedding import PackedWeight, share_tied_tables
from .quantization.sites import LinearSite, linear_site, normalize_layers, rewrite_selected_linears
from .rewrite import Rewriter

EVERY_LINEAR = ("*",)


def blocks_from_file(path: str) -> dict[str, QuantizedRows]:
    """The quantized 2-D tensors of a GGUF file under their own names (rows as stored)."""
    f = open_gguf(path)
    return {t.name: decode_rows(format_of(t.type_id, t.type_name), f.tensor_bytes(t), *t.shape)
            for t in f.tensors if t.type_name not in ("F32", "F16", "BF16") and len(t.shape) == 2}


def gguf_operands(q: QuantizedRows) -> list[np.ndarray]:
    """The qlinear weight operands (codes, scales, [offsets]) of a GGUF tensor's blocks."""
    scheme = get_scheme(q.fmt.scheme_name)
    ops = [pack_codes(q.codes, scheme.bits), np.ascontiguousarray(q.scales, dtype=scheme.scale_dtype)]
    if scheme.offsets:
        ops.append(np.ascontiguousarray(q.offsets, dtype=scheme.scale_dtype))
    return ops


def _attrs(site: LinearSite, fmt: BlockFormat, has_bias: bool) -> dict:
    return qlinear_attrs(site.weight_type.shape, get_scheme(fmt.scheme_name), fmt.group_size, "", 0.0, has_bias)


@register_pass
@dataclass(frozen=True)
class GGUFQuantize(Pass):
    name = "gguf-quantize"
    idempotent = True  # it rewrites only `linear` nodes and leaves none it would rewrite again
    layers: tuple[str, ...] = ()
    source: object = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", normalize_layers(self.layers))
        if self.source is None:
            raise ValueError("gguf-quantize needs source=FILE.gguf (or the blocks the frontend decoded: "
                             "compile a .gguf model with quant='gguf')")

    def _blocks(self) -> Mapping[str, QuantizedRows]:
        if isinstance(self.source, Mapping):
            return self.source
        return blocks_from_file(str(self.source))

    def apply(self, module: Module) -> Module:
        blocks = self._blocks()
        packed: dict[str, tuple[str, BlockFormat]] = {}  # a tied weight (embedding / lm_head) is packed once
        tied: dict[str, PackedWeight] = {}

        def pack(site: LinearSite) -> tuple[str, BlockFormat]:
            q = blocks[site.weight_name]
            if q.codes.shape != tuple(site.weight_type.shape):
                raise ValueError(f"linear {site.module_path}: GGUF tensor {site.weight_name} has shape "
                                 f"{q.codes.shape}, the weight {site.weight_type.shape}")
            weight = np.asarray(site.weight, dtype=np.float32)
            if not np.array_equal(q.dequantize().view(np.uint32), weight.view(np.uint32)):
                raise ValueError(f"linear {site.module_path}: the GGUF blocks of {site.weight_name} do not "
                                 f"dequantize to the captured weight (another file, or rows in another order)")
            roles = operand_roles(_attrs(site, q.fmt, False))
            prefix = site.rewriter.add_tensors(site.weight_name, {f".{r}": a for r, a in zip(roles, gguf_operands(q))})
            return prefix, q.fmt

        def keep_source_quantization(node: Node, rw: Rewriter) -> None:
            site = linear_site(node, rw)
            if site is None or site.weight_name not in blocks:
                return  # a float tensor in the file (or no file tensor): stays a linear
            if site.weight_name not in packed:
                packed[site.weight_name] = pack(site)
            prefix, fmt = packed[site.weight_name]
            attrs = _attrs(site, fmt, len(node.inputs) == 3)
            tied.setdefault(site.weight_name, PackedWeight(prefix, attrs))
            consts = tuple(rw.constant(f"{prefix}.{r}", f"{node.output.name}.{r}", site.weight_loc)
                           for r in operand_roles(attrs))
            rw.replace(Node("qlinear", (node.inputs[0],) + consts + node.inputs[2:], node.outputs, attrs, node.loc))

        kept = rewrite_selected_linears(module, self.layers or EVERY_LINEAR, keep_source_quantization,
                                        "keep_source_quantization")
        return share_tied_tables(kept, tied)  # the file's token_embd: the lm_head's Q8_0 rows, as llama.cpp reads it
