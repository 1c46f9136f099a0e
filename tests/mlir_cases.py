"""Modules for the MLIR tests: the random-init tiny Llama with its symbolic dims fixed."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bitsmith.ir import Module, TensorType, verify_module
from bitsmith.ir import symbolic as sym


def _fixed(d, bindings: Mapping[str, int]):
    if isinstance(d, str):
        try:
            names = sym.symbols(d)
        except sym.SymbolicDimError:
            return d
        if names and names <= set(bindings):
            return sym.evaluate(d, bindings)
    if isinstance(d, tuple):
        return tuple(_fixed(x, bindings) for x in d)
    return d


def specialize(module: Module, bindings: Mapping[str, int]) -> Module:
    """``module`` with every symbolic dim in ``bindings`` replaced by its size (types and the
    shape/bound attributes of reshape, expand, slice, arange), verified again."""
    def fix_type(t: TensorType) -> TensorType:
        return TensorType(tuple(_fixed(d, bindings) for d in t.shape), t.dtype)

    funcs = []
    for fn in module.functions:
        params = tuple(p.__class__(p.name, fix_type(p.type)) for p in fn.params)
        nodes = tuple(n.replace(outputs=tuple(o.__class__(o.name, fix_type(o.type)) for o in n.outputs),
                                attrs=tuple((k, _fixed(v, bindings)) for k, v in n.attrs)) for n in fn.nodes)
        funcs.append(fn.replace(params=params, nodes=nodes))
    return verify_module(module.replace(functions=tuple(funcs)))


def tiny_llama_module(batch: int = 1, seq: int = 5, past: int = 3) -> tuple[Module, list[np.ndarray]]:
    """The random-init tiny Llama of hf_configs (2 layers, GQA 4/2 heads, d=64) with a KV cache,
    its dims fixed, and inputs: token ids, positions after ``past`` cached ones, random caches."""
    import bitsmith
    from bitsmith.testing.hf_configs import VOCAB, make_model

    module = bitsmith.compile(make_model("llama"), target="reference").module
    static = specialize(module, {"batch": batch, "seq": seq, "past": past})
    rng = np.random.default_rng(0)
    args: list[np.ndarray] = [rng.integers(0, VOCAB, (batch, seq)).astype(np.int64),
                              np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)]
    for p in static.functions[0].params[2:]:
        if p.name == "attention_mask":  # every key attended
            args.append(np.ones(p.type.shape, dtype=np.int64))
            continue
        args.append(rng.standard_normal(p.type.shape).astype(np.float32))
    return static, args
