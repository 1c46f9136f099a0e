"""What all programs of a module share: the HBM constant image, the layer table, the MISC op
table; and the image's bytes (absent in timing-only mode, where constants are known by shape)."""

from __future__ import annotations

import numpy as np

from ...ir import Module
from ...ir.declared_tensors import DeclaredTensorTable
from ...ir.quantized import parse_sparsity
from .codegen import ATTN_SOFTMAX, KV_APPEND, MATRIX_OPS, Image, ModuleContext
from .presets import Preset
from .weights import Layer, compress_fp32_nm, fp32_layer, qlinear_layer


def _info(module: Module, name: str) -> tuple[str, tuple[int, ...], str]:
    info = module.tensors.info(name)
    return name, tuple(info.shape), info.dtype


def build_context(module: Module, preset: Preset) -> ModuleContext:
    image = Image()
    layers: list[Layer] = []
    by_weight: dict[str, int] = {}
    index: dict[tuple[str, str], int] = {}
    misc = {KV_APPEND, ATTN_SOFTMAX}
    for fn in module.functions:
        consts = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
        for node in fn.nodes:
            if node.op not in MATRIX_OPS or (node.op in ("linear", "qlinear") and node.inputs[1] not in consts):
                if node.op not in ("constant",) and node.op not in MATRIX_OPS:
                    misc.add(node.op)
                continue
            if node.op not in ("linear", "qlinear"):
                continue
            attrs = node.attr_dict
            weight_name = consts[node.inputs[1]]
            if weight_name not in by_weight:
                where = node.loc.module_path if node.loc is not None and node.loc.module_path else weight_name
                if node.op == "qlinear":
                    n_w = len(node.inputs) - 1 - (1 if attrs["bias"] else 0)
                    tensors = [_info(module, consts[v]) for v in node.inputs[1:1 + n_w]]
                    bias = _info(module, consts[node.inputs[-1]]) if attrs["bias"] else None
                    layer = qlinear_layer(where, attrs, tensors, bias)
                else:
                    bias = _info(module, consts[node.inputs[2]]) if len(node.inputs) == 3 else None
                    layer = fp32_layer(where, _info(module, weight_name), attrs.get("sparsity") or "", bias)
                by_weight[weight_name] = len(layers)
                layers.append(layer)
            index[(fn.name, node.inputs[1])] = by_weight[weight_name]
    # the image: every constant a program reads, then the sections the backend derives
    for fn in module.functions:
        for node in fn.nodes:
            if node.op == "constant":
                image.add(*_info(module, node.attr("name")))
    for layer in layers:
        for s in layer.sections + ((layer.bias,) if layer.bias else ()):
            image.add(s.tensor, s.shape, s.dtype)
    return ModuleContext(module, preset, image, layers, index, sorted(misc))


def has_data(module: Module) -> bool:
    t = module.tensors
    if isinstance(t, DeclaredTensorTable):
        return not t.declared()
    return True


def image_bytes(ctx: ModuleContext) -> bytes:
    """The HBM constant image (module constants and the derived fp32 N:M sections)."""
    module = ctx.module
    derived: dict[str, np.ndarray] = {}
    for layer in ctx.layers:
        if layer.fmt == "fp32" and layer.sparsity:
            n, m = parse_sparsity(layer.sparsity)
            base = layer.sections[0].tensor[:-len(".fpga_values")]
            vals, idx = compress_fp32_nm(np.asarray(module.tensors[base], dtype=np.float32), n, m)
            derived[layer.sections[0].tensor] = vals
            derived[layer.sections[1].tensor] = idx
    buf = bytearray(ctx.image.size)
    for name, (addr, shape, dtype) in ctx.image.entries.items():
        arr = derived[name] if name in derived else module.tensors[name]
        data = np.ascontiguousarray(arr, dtype=np.dtype(dtype)).tobytes()
        buf[addr:addr + len(data)] = data
    return bytes(buf)
