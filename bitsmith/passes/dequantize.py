"""Pass ``dequantize``: ``qlinear`` nodes of the named schemes become ``linear`` nodes on their
exact float32 weight (``bitsmith.ir.quantized.dequantize``).

A backend whose kernels do not implement a weight format puts this pass in its legalize phase
with the schemes it lacks (``dequantize{schemes=gguf-q4_1|gguf-q8_0}``), so such a model still
runs, computing with bit-identical weights in dense float32 (bigger and slower, never wrong).
Option ``schemes``: globs over scheme names (separated by spaces, ``;`` or ``|``); none: the
pass changes nothing. Option ``gathers``: the same for ``qembedding`` nodes (a tied table's
packed rows, ``bitsmith/ir/quantized_embedding.py``), which become an ``embedding`` of the
decoded float32 table. A weight shared by several nodes (a tied lm_head and its embedding) is
decoded once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from bitsmith.ir import Module, Node
from bitsmith.ir.quantized import dequantize

from .base import Pass, register_pass
from .quantization.sites import normalize_layers
from .rewrite import Pattern, Rewriter, apply_patterns


@register_pass
@dataclass(frozen=True)
class Dequantize(Pass):
    name = "dequantize"
    idempotent = True  # it leaves no qlinear of the named schemes
    schemes: tuple[str, ...] = ()
    gathers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", normalize_layers(self.schemes))
        object.__setattr__(self, "gathers", normalize_layers(self.gathers))

    def apply(self, module: Module) -> Module:
        if not self.schemes and not self.gathers:
            return module
        decoded: dict[tuple[str, ...], str] = {}

        def decoded_weight(node: Node, rw: Rewriter, operands: tuple[str, ...]) -> str | None:
            producers = [rw.producer(v) for v in operands]
            if any(p is None or p.op != "constant" for p in producers):
                return None  # operands computed at run time: not this pass's business
            names = tuple(p.attr("name") for p in producers)
            if names not in decoded:
                weight = dequantize(node.attr_dict, [rw.tensor(n) for n in names]).astype(np.float32)
                decoded[names] = rw.add_tensor(f"{names[0].rsplit('.', 1)[0]}.dequantized", weight)
            return rw.constant(decoded[names], f"{node.output.name}.weight", producers[0].loc)

        def to_linear(node: Node, rw: Rewriter) -> None:
            n_weight = len(node.inputs) - 1 - (1 if node.attr("bias") else 0)
            w = decoded_weight(node, rw, node.inputs[1:1 + n_weight])
            if w is not None:
                rw.replace(Node("linear", (node.inputs[0], w) + node.inputs[1 + n_weight:], node.outputs, {},
                                node.loc))

        def to_embedding(node: Node, rw: Rewriter) -> None:
            table = decoded_weight(node, rw, node.inputs[:-1])
            if table is not None:
                rw.replace(Node("embedding", (table, node.inputs[-1]), node.outputs, {}, node.loc))

        def named(globs: tuple[str, ...]):
            return lambda node, rw: any(fnmatch.fnmatchcase(str(node.attr("scheme")), g) for g in globs)

        patterns = [Pattern(to_linear, frozenset({"qlinear"}), where=named(self.schemes), name="dequantize_qlinear"),
                    Pattern(to_embedding, frozenset({"qembedding"}), where=named(self.gathers),
                            name="dequantize_qembedding")]
        return apply_patterns(module, patterns, once=True, remove_dead=True).prune_tensors()
