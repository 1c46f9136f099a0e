"""Tiny random modules of ``linear`` layers with module paths, for the weight-pass tests."""

from __future__ import annotations

import numpy as np

from bitsmith.ir import GraphBuilder, Location, Module, TensorType

UP, DOWN, HEAD = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head"


def mlp_module(k: int = 32, hidden: int = 16, vocab: int = 8, seed: int = 0, batch: int = 3,
               weights: dict[str, np.ndarray] | None = None) -> Module:
    """x[batch, k] -> up (with bias) -> relu -> down -> lm_head; weights named ``<path>.weight``."""
    rng = np.random.default_rng(seed)
    w = {UP: rng.standard_normal((hidden, k)), DOWN: rng.standard_normal((k, hidden)),
         HEAD: rng.standard_normal((vocab, k))}
    w = {p: a.astype(np.float32) for p, a in {**w, **(weights or {})}.items()}
    b = GraphBuilder()
    x = b.param("x", TensorType((batch, k), "float32"))

    def linear(inp: str, path: str, bias: bool = False) -> str:
        loc = Location(module_path=path)
        ins = [inp, b.constant(f"{path}.weight", w[path], loc)]
        if bias:
            ins.append(b.constant(f"{path}.bias", rng.standard_normal(w[path].shape[0]).astype(np.float32), loc))
        return b.op("linear", ins, loc=loc)

    h = b.op("relu", [linear(x, UP, bias=True)])
    return b.module([linear(linear(h, DOWN), HEAD)])


def nodes_of(module: Module, op: str) -> list:
    return [n for n in module.functions[0].nodes if n.op == op]


def operands_of(module: Module, node) -> list[np.ndarray]:
    """The arrays behind a node's constant operands (x, a parameter, is skipped)."""
    producers = module.functions[0].producers()
    return [module.tensors[producers[i].attr("name")] for i in node.inputs[1:]]


def dense_equivalent(module: Module, decode) -> Module:
    """The module with every qlinear replaced by a plain linear on ``decode(attrs, operands)``
    (a dense float32 [out, in] weight), its bias kept."""
    from bitsmith.ir import Node, Value

    fn = module.functions[0]
    producers = fn.producers()
    tensors, nodes = {}, []
    for node in fn.nodes:
        if node.op != "qlinear":
            nodes.append(node)
            continue
        attrs = node.attr_dict
        arrays = [module.tensors[producers[i].attr("name")] for i in node.inputs[1:]]
        bias = node.inputs[-1:] if attrs["bias"] else ()
        weight = np.asarray(decode(attrs, arrays[:len(arrays) - len(bias)]), dtype=np.float32)
        name = f"{node.output.name}.dense_weight"
        tensors[name] = weight
        const = Node("constant", (), (Value(name, TensorType(weight.shape, "float32")),), {"name": name})
        nodes += [const, Node("linear", (node.inputs[0], name) + tuple(bias), node.outputs, (), node.loc)]
    out = module.replace(functions=(fn.replace(nodes=tuple(nodes)),) + module.functions[1:])
    return out.replace(tensors=out.tensors.with_tensors(tensors)).prune_tensors()
