"""Capturing a deep decoder by exporting three of its layers and stamping the rest in the IR.

torch.export of SmolLM2's 30 decoder layers takes most of a cold compile's capture time,
yet every layer traces to the same aten graph: only parameter names and SSA numbers differ.
So when ``decoder_layers`` finds the layers interchangeable (one class; the same parameter
and buffer names, shapes and dtypes; no per-layer variation in the config; no weight shared
with another tensor), ``capture_causal_lm`` exports the model cut to ``CAPTURED_LAYERS``
layers, and ``stamp_layers`` copies layer 1's nodes for layers 3..N-1: constant names and
locations ``model.layers.1.`` -> ``model.layers.i.``, values defined in layer 0 (the residual
stream entering layer 1) -> layer i-1's value at the same position in its layer, then every
value renumbered in node order, as the full lowering numbers them.

Layer 2 is exported only to check the copy: stamping layer 2 from layer 1 must give exactly
the nodes the export gave. Where it does not, or the graph is not laid out as prelude /
layers in order / epilogue, ``stamp_layers`` returns None and the caller exports all layers.
The result equals the full export's module (tests/test_layer_stamp.py compares printed IR
and tensor tables).
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..ir import Function, Node, Value
from ..ir.graph import Location

CAPTURED_LAYERS = 3  # layer 0 may differ from the rest (it reads the embedding); 1 is the template, 2 the check
_LAYER = re.compile(r"^model\.layers\.(\d+)(?=\.|$)")
_STAMPABLE = ("LlamaForCausalLM", "Qwen2ForCausalLM")  # decoders whose layers differ only by weights
_VALUE = re.compile(r"^v(\d+)$")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """``model.model.layers`` when its layers can be stamped from one another (module
    docstring), else None (the caller exports every layer)."""
    cfg = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if type(model).__name__ not in _STAMPABLE or cfg is None or not isinstance(layers, torch.nn.ModuleList):
        return None
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None or len(layers) != n or n <= CAPTURED_LAYERS:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        return None  # e.g. sliding-window layers among full-attention ones
    if getattr(cfg, "use_sliding_window", False):
        return None
    first = _signature(layers[0])
    if any(_signature(layer) != first for layer in layers):
        return None
    # the lowering names a tensor shared by storage after its first user: a stamped layer may own no shared one
    counts: dict[tuple, int] = {}
    for t in _named_tensors(model).values():
        counts[_storage_key(t)] = counts.get(_storage_key(t), 0) + 1
    for layer in list(layers)[CAPTURED_LAYERS:]:
        if any(counts[_storage_key(t)] > 1 for t in _layer_tensors(layer)):
            return None
    return layers


_PLAIN = (bool, int, float, str, type(None))
_PER_LAYER_ATTRS = ("layer_idx",)  # differs by design; used by HF's KV cache, which the capture does not export


def _signature(layer: torch.nn.Module) -> list[tuple]:
    """What must agree between two layers for one's graph to stand for the other's: module
    classes, plain attributes (e.g. an attention scale set on one layer), hooks, and the
    names, shapes and dtypes of parameters and buffers."""
    out: list[tuple] = []
    for path, mod in layer.named_modules(remove_duplicate=False):
        plain = sorted((k, v) for k, v in vars(mod).items()
                       if isinstance(v, _PLAIN) and not k.startswith("_") and k not in _PER_LAYER_ATTRS)
        hooks = tuple(len(getattr(mod, h, None) or ()) for h in
                      ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"))
        out.append((path, type(mod), tuple(plain), hooks))
    out += [(name, tuple(t.shape), t.dtype, t.requires_grad) for name, t in
            list(layer.named_parameters(remove_duplicate=False)) + list(layer.named_buffers(remove_duplicate=False))]
    return out


def _layer_tensors(layer: torch.nn.Module) -> list[torch.Tensor]:
    return [t for _, t in list(layer.named_parameters(remove_duplicate=False))
            + list(layer.named_buffers(remove_duplicate=False))]


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _storage_key(t: torch.Tensor) -> tuple:
    """What ``lower_exported_program`` recognizes a tied tensor by."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


@contextlib.contextmanager
def truncated(model: torch.nn.Module, keep: int) -> Iterator[None]:
    """While active, ``model`` (see ``decoder_layers``) runs only its first ``keep`` layers."""
    inner = model.model
    configs = list({id(c): c for c in (model.config, getattr(inner, "config", model.config))}.values())
    saved_layers = inner.layers
    saved = [(c, c.num_hidden_layers, getattr(c, "layer_types", None)) for c in configs]
    inner.layers = torch.nn.ModuleList(list(saved_layers)[:keep])
    for c, _, types in saved:
        c.num_hidden_layers = keep
        if types is not None:
            c.layer_types = list(types)[:keep]
    try:
        yield
    finally:
        inner.layers = saved_layers
        for c, n, types in saved:
            c.num_hidden_layers = n
            if types is not None:
                c.layer_types = types


def tensor_reader(model: torch.nn.Module, to_numpy: Callable[[torch.Tensor], np.ndarray],
                  unmaterialized: Callable[[torch.Tensor], bool] | None) -> Callable[[str], np.ndarray | None]:
    """Tensor name (as the lowering names it) -> its data as the lowering converts it (None
    where ``unmaterialized``: the caller's table supplies it)."""
    named = _named_tensors(model)

    def read(name: str) -> np.ndarray | None:
        t = named[name]
        return None if unmaterialized is not None and unmaterialized(t) else to_numpy(t)
    return read


def _layer_of(node: Node) -> int | None:
    if node.op == "constant":
        m = _LAYER.match(str(node.attr("name") or ""))
    else:
        m = _LAYER.match(node.loc.module_path) if node.loc is not None else None
    return int(m.group(1)) if m else None


def _split(fn: Function) -> tuple[list[list[Node]], list[list[Node]], list[list[Node]]] | None:
    """(globals) [A, B, E], (constants) [C0, C1, C2], (compute) [K0, K1, K2] of a graph laid out
    A C0 C1 C2 B K0 K1 K2 E (A, E may be empty), or None."""
    runs: list[tuple[int | None, list[Node]]] = []
    for node in fn.nodes:
        layer = _layer_of(node)
        if runs and runs[-1][0] == layer:
            runs[-1][1].append(node)
        else:
            runs.append((layer, [node]))
    layers = list(range(CAPTURED_LAYERS))
    if runs and runs[0][0] is not None:
        runs.insert(0, (None, []))
    if runs and runs[-1][0] is not None:
        runs.append((None, []))
    ids = [r[0] for r in runs]
    if ids != [None, *layers, None, *layers, None]:
        return None
    nodes = [r[1] for r in runs]
    k = CAPTURED_LAYERS
    consts, compute = nodes[1:1 + k], nodes[k + 2:2 * k + 2]
    if any(n.op != "constant" for c in consts for n in c) or any(n.op == "constant" for c in compute for n in c):
        return None
    return [nodes[0], nodes[k + 1], nodes[2 * k + 2]], consts, compute


def _rename_layer(text: str, src: int, dst: int) -> str:
    prefix = f"model.layers.{src}"
    if text == prefix or text.startswith(prefix + "."):
        return f"model.layers.{dst}" + text[len(prefix):]
    return text


def _outputs(nodes: Sequence[Node]) -> list[str]:
    return [o.name for n in nodes for o in n.outputs]


def _stamp(template: tuple[list[Node], list[Node]], prev_template: tuple[list[Node], list[Node]],
           src: int, dst: int, names: tuple[list[str], list[str]], prev_names: tuple[list[str], list[str]],
           ) -> tuple[list[Node], list[Node]] | None:
    """Layer ``dst``'s (constants, compute) copied from layer ``src``'s ``template``; ``names``:
    the output names to give them (in order), ``prev_*``: layer src-1's nodes and layer dst-1's
    names. None where a template node reads something other than its own layer, layer src-1's
    compute or the layer-free prelude."""
    own = dict(zip(_outputs(template[0]) + _outputs(template[1]), names[0] + names[1]))
    prev = dict(zip(_outputs(prev_template[1]), prev_names[1]))
    foreign = set(_outputs(prev_template[0]))  # layer src-1's weights: a layer reading them is not stamped

    def value(name: str) -> str | None:
        if name in own:
            return own[name]
        if name in prev:
            return prev[name]
        return None if name in foreign else name

    out: tuple[list[Node], list[Node]] = ([], [])
    for part, nodes in zip(out, template):
        for node in nodes:
            inputs = [value(i) for i in node.inputs]
            if any(i is None for i in inputs):
                return None
            attrs = node.attrs
            if node.op == "constant":
                attrs = tuple((k, _rename_layer(v, src, dst) if k == "name" and isinstance(v, str) else v)
                              for k, v in attrs)
            loc = node.loc
            if loc is not None:
                loc = Location(_rename_layer(loc.module_path, src, dst), loc.source)
            outputs = tuple(Value(own[o.name], o.type) for o in node.outputs)
            part.append(Node(node.op, tuple(inputs), outputs, attrs, loc))
    return out


def stamp_layers(fn: Function, tensors: Mapping[str, np.ndarray], n_layers: int,
                 read: Callable[[str], np.ndarray | None]) -> tuple[Function, dict] | None:
    """``fn`` (the lowering of the first ``CAPTURED_LAYERS`` layers) with layers up to
    ``n_layers`` stamped in, and its tensors in the lowering's order (name -> array; names
    ``tensors`` lacks stay declared, as the lowering leaves unmaterialized ones). ``read``: see
    ``tensor_reader``. None: the graph does not allow it (the caller exports all layers)."""
    split = _split(fn)
    if split is None:
        return None
    (pre, mid, epi), consts, compute = split
    # the full lowering numbers values v0, v1, ... in node order: renumbering below relies on it
    order = [o.name for n in fn.nodes for o in n.outputs]
    if [f"v{i}" for i in range(len(order))] != order or any(_VALUE.match(p.name) for p in fn.params):
        return None
    seg = [(consts[j], compute[j]) for j in range(CAPTURED_LAYERS)]
    # check: layer 2 stamped from layer 1 is what the export gave
    names2 = (_outputs(seg[2][0]), _outputs(seg[2][1]))
    names1 = (_outputs(seg[1][0]), _outputs(seg[1][1]))
    if _stamp(seg[1], seg[0], 1, 2, names2, names1) != (seg[2][0], seg[2][1]):
        return None
    layers = list(seg)
    prev_names = names2
    for i in range(CAPTURED_LAYERS, n_layers):
        names = ([f"{o}.L{i}" for o in names1[0]], [f"{o}.L{i}" for o in names1[1]])
        stamped = _stamp(seg[1], seg[0], 1, i, names, prev_names)
        if stamped is None:
            return None
        layers.append(stamped)
        prev_names = names
    # the epilogue reads the last layer where it read layer 2, and nothing of layers 0 and 1
    last = dict(zip(names2[1], prev_names[1]))
    earlier = set(_outputs(sum((list(c) + list(k) for c, k in seg[:2]), []))) | set(names2[0])
    if any(i in earlier for n in epi for i in n.inputs) or any(r in earlier for r in fn.results):
        return None
    epi = [n.replace(inputs=tuple(last.get(i, i) for i in n.inputs)) for n in epi]
    results = [last.get(r, r) for r in fn.results]
    nodes = pre + [n for c, _ in layers for n in c] + mid + [n for _, k in layers for n in k] + epi
    renamed = {o.name: f"v{i}" for i, o in enumerate(o for n in nodes for o in n.outputs)}
    nodes = [n.replace(inputs=tuple(renamed.get(i, i) for i in n.inputs),
                       outputs=tuple(Value(renamed[o.name], o.type) for o in n.outputs)) for n in nodes]
    table: dict[str, np.ndarray] = {}
    template_names = {str(n.attr("name")) for n in consts[1]}
    for node in nodes:
        if node.op != "constant":
            continue
        name = str(node.attr("name"))
        if name in table:
            continue
        if name in tensors:
            table[name] = tensors[name]
            continue
        layer = _LAYER.match(name)
        if layer is None or int(layer.group(1)) < CAPTURED_LAYERS:
            continue  # declared by the lowering (unmaterialized)
        data = read(name)
        template = _rename_layer(name, int(layer.group(1)), 1)
        if template not in template_names or (data is None) != (template not in tensors):
            return None  # materialized in one layer, not in another
        if data is not None:
            table[name] = data
    return fn.replace(nodes=tuple(nodes), results=tuple(renamed.get(r, r) for r in results)), table
