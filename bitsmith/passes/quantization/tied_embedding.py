"""Tied weights quantized once and shared: an ``embedding`` whose table is the weight a weight
pass just packed for a linear (SmolLM2's tied lm_head) becomes a ``qembedding`` on the same
packed constants, so the float table leaves the module (113 MB of SmolLM2's 135M parameters)
and the gather reads the numbers the lm_head computes with, as llama.cpp does with a tied
``token_embd``. Targets whose kernels lack the gather for a scheme get the float table back,
decoded once, from their ``dequantize`` legalize pass."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.ir import Module, Node

from ..rewrite import Pattern, Rewriter, apply_patterns
from .pack import operand_roles


@dataclass(frozen=True)
class PackedWeight:
    """A table tensor packed as a qlinear's weight: its constants' name prefix and attributes."""

    prefix: str
    attrs: dict


def gatherable(attrs: dict) -> bool:
    """Dense packed weights only: ``qembedding`` gathers no N:M indices or outlier CSR rows."""
    return not attrs["sparsity"] and not attrs["outliers"]


def share_tied_tables(module: Module, packed: dict[str, PackedWeight]) -> Module:
    """Every ``embedding`` whose table constant is a key of ``packed`` reads those packed rows
    instead; the float table goes when nothing else reads it."""
    if not packed:
        return module

    def gather_packed(node: Node, rw: Rewriter) -> None:
        producer = rw.producer(node.inputs[0])
        if producer is None or producer.op != "constant" or producer.attr("name") not in packed:
            return
        if rw.tensor_type(producer.attr("name")).dtype != "float32":
            return  # the gather's rows are float32: a float16 table keeps its own type
        p = packed[producer.attr("name")]
        attrs = {**p.attrs, "bias": False}
        consts = tuple(rw.constant(f"{p.prefix}.{r}", f"{node.output.name}.{r}", producer.loc)
                       for r in operand_roles(attrs))
        rw.replace(Node("qembedding", consts + (node.inputs[1],), node.outputs, attrs, node.loc))

    pattern = Pattern(gather_packed, frozenset({"embedding"}), name="gather_tied_packed_rows")
    return apply_patterns(module, [pattern], once=True, remove_dead=True).prune_tensors()
