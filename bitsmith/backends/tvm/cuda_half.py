"""fp16 activations for tvm-cuda: rewrite a module's float32 values to float16.

GPUs run LLM inference with half-precision activations and weights (half the bytes moved,
which bounds decode speed). The rewrite is target-side (the IR passes stay
target-neutral): every float32 parameter, constant, node result and ``cast``/``scalar``/
``arange`` dtype becomes float16, except values that need float32 range or resolution:

* position-derived values (a ``cast`` from an integer, and everything computed only from
  such values, constants and scalars: rotary angles ``pos * inv_freq``, cos, sin, masks).
  fp16 has an 11-bit significand, so angles of positions in the hundreds would be off by
  tenths of a radian;
* the chain started by ``pow`` (RMSNorm's mean of squares): x**2 overflows fp16 for
  |x| > 256. Its input is widened to float32 (as HF's fp16 Llama does).

Where a float32 value meets float16 values, a ``cast`` to float16 is inserted (once per
value). Reductions and attention in the kernels accumulate in float32 anyway
(``fused_rules``, ``attention``). Quantized operands keep their integer layout; their scales
are already fp16. Function results (logits, KV cache) are float16; the executor hands
back float32 arrays like every target.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...ir import Module
from ...ir.graph import Function, Node, Value, freeze_attrs
from ...ir.ops import get_op
from ...ir.types import TensorType

HALF, FULL = "float16", "float32"
WIDEN_OPS = frozenset({"pow"})                      # computed in float32 from a widened input
NEVER_PRECISE = frozenset({"embedding", "linear", "qlinear", "attention", "constant", "scalar"})
DTYPE_ATTR_OPS = frozenset({"cast", "scalar", "arange"})
INT_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "bool"})


def _precise_values(fn: Function) -> set[str]:
    """Float32 values that stay float32 (see the module docstring)."""
    types = fn.value_types()
    producers = fn.producers()
    precise: set[str] = set()
    for node in fn.nodes:
        out = node.outputs[0].name if len(node.outputs) == 1 else None
        if out is None or types[out].dtype != FULL or node.op in NEVER_PRECISE:
            continue
        if node.op in WIDEN_OPS:
            precise.add(out)
            continue
        float_ins = [i for i in node.inputs if types[i].dtype in (FULL, HALF)]
        if node.op == "cast" and types[node.inputs[0]].dtype in INT_DTYPES:
            precise.add(out)
        elif float_ins and any(i in precise for i in float_ins) and all(
                i in precise or producers.get(i) is not None and producers[i].op in ("constant", "scalar")
                for i in float_ins):
            precise.add(out)
    return precise


def _half_type(t: TensorType) -> TensorType:
    return TensorType(t.shape, HALF) if t.dtype == FULL else t


def _convert_function(fn: Function, tensors: Any, new_tensors: dict[str, np.ndarray]) -> Function:
    precise = _precise_values(fn)
    producers = fn.producers()
    types: dict[str, TensorType] = {}
    params = []
    for p in fn.params:
        params.append(Value(p.name, _half_type(p.type)))
        types[p.name] = params[-1].type
    nodes: list[Node] = []
    full_constants: set[str] = set()  # values of float32 constants that a precise node reads
    for node in fn.nodes:
        if node.outputs[0].name in precise:
            full_constants.update(i for i in node.inputs if producers.get(i) is not None
                                  and producers[i].op == "constant")
    casts: dict[str, str] = {}
    widened: dict[str, str] = {}

    def cast_node(src: str, dtype: str, cache: dict[str, str]) -> str:
        if src not in cache:
            name = f"{src}_{'h' if dtype == HALF else 'f'}"
            t = TensorType(types[src].shape, dtype)
            nodes.append(Node("cast", (src,), (Value(name, t),), freeze_attrs({"dtype": dtype})))
            types[name] = t
            cache[src] = name
        return cache[src]

    for node in fn.nodes:
        out = node.outputs[0].name
        keep_full = out in precise
        if node.op == "constant":
            t = node.outputs[0].type
            name = node.attr("name")
            if t.dtype == FULL and out not in full_constants:
                new_tensors[name] = np.ascontiguousarray(tensors[name], dtype=np.float16)
                t = TensorType(t.shape, HALF)
            types[out] = t
            nodes.append(node.replace(outputs=(Value(out, t),)))
            continue
        inputs = []
        for i in node.inputs:
            dt = types[i].dtype
            if (node.op in WIDEN_OPS or keep_full) and dt == HALF:  # e.g. a scalar read by a precise op
                inputs.append(cast_node(i, FULL, widened))
            elif not keep_full and dt == FULL:  # a precise value or float32 constant meets fp16
                inputs.append(cast_node(i, HALF, casts))
            else:
                inputs.append(i)
        attrs = node.attr_dict
        if node.op in DTYPE_ATTR_OPS and attrs.get("dtype") == FULL and not keep_full:
            attrs["dtype"] = HALF
        frozen = freeze_attrs(attrs)
        opdef = get_op(node.op)
        out_types = opdef.infer(tuple(types[i] for i in inputs), dict(frozen))
        outputs = tuple(Value(o.name, t) for o, t in zip(node.outputs, out_types))
        for v in outputs:
            types[v.name] = v.type
        nodes.append(node.replace(inputs=tuple(inputs), outputs=outputs, attrs=frozen))
    results = []
    for r in fn.results:
        results.append(cast_node(r, HALF, casts) if types[r].dtype == FULL else r)
    return Function(fn.name, tuple(params), tuple(nodes), tuple(results))


def to_half(module: Module) -> Module:
    """The module with float16 activations and weights (see the module docstring)."""
    new_tensors: dict[str, np.ndarray] = {}
    functions = [_convert_function(fn, module.tensors, new_tensors) for fn in module.functions]
    return module.replace(functions=tuple(functions), tensors=module.tensors.with_tensors(new_tensors))


def convert_activations(module: Module, act_dtype: str) -> Module:
    """``module`` itself for float32 activations, ``to_half(module)`` for float16."""
    if act_dtype == FULL:
        return module
    if act_dtype == HALF:
        return to_half(module)
    raise ValueError(f"act_dtype must be 'float16' or 'float32', got {act_dtype!r}")
