"""Pass ``half-precision``: float16 activations and weights, float32 where range or resolution needs it.

GPUs run LLM inference with half-precision activations and weights (half the bytes moved,
which bounds decode speed); tvm-cuda runs this pass as the ``lower`` phase of its pipeline
(option ``act_dtype="float16"``, the default). Every float32 parameter, constant, node
result and dtype attribute (ops with trait DTYPE_FROM_ATTR) becomes float16, except values
that need float32 range or resolution:

* position-derived values (a DTYPE_FROM_ATTR op, i.e. a ``cast``, from an integer, and
  everything computed only from such values and LITERAL ones: rotary angles
  ``pos * inv_freq``, cos, sin, masks). fp16 has an 11-bit significand, so angles of
  positions in the hundreds would be off by tenths of a radian. The output of an op that
  reads learned weights or activations (LINEAR_LIKE, GATHER, ATTENTION) or has no inputs
  (SOURCE) is never position-derived;
* the chain started by an op with trait WIDENS_RANGE (``pow``, RMSNorm's mean of squares):
  x**2 overflows fp16 for |x| > 256. Its input is widened to float32 (as HF's fp16 Llama does).

Where a float32 value meets float16 values, a ``cast`` to float16 is inserted (once per
value). The tvm kernels accumulate reductions and attention in float32 anyway
(``fused_rules``, ``attention``). Quantized operands keep their integer layout; their scales
are already fp16. Function results (logits, KV cache) are float16; executors hand back
float32 arrays like every target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsmith.errors import PassError
from bitsmith.ir import Module
from bitsmith.ir.graph import Function, Node, Value, freeze_attrs
from bitsmith.ir.ops import get_op
from bitsmith.ir.traits import (ATTENTION, DTYPE_FROM_ATTR, GATHER, LINEAR_LIKE, LITERAL, SOURCE, WIDENS_RANGE,
                                has_trait)
from bitsmith.ir.types import INT_DTYPES, TensorType

from .base import Pass, register_pass

HALF, FULL = "float16", "float32"
NARROW_DTYPES = (HALF,)  # the narrow floats the IR has


def _never_position_derived(op: str) -> bool:
    """Outputs that are learned activations (reading weights, tables or attention state) or
    have no inputs; see the module docstring."""
    return any(has_trait(op, t) for t in (LINEAR_LIKE, GATHER, ATTENTION, SOURCE))


def _is_literal(node: Node | None) -> bool:
    return node is not None and has_trait(node.op, LITERAL)


def _precise_values(fn: Function) -> set[str]:
    """Float32 values that stay float32 (see the module docstring)."""
    types = fn.value_types()
    producers = fn.producers()
    precise: set[str] = set()
    for node in fn.nodes:
        out = node.outputs[0].name if len(node.outputs) == 1 else None
        if out is None or types[out].dtype != FULL or _never_position_derived(node.op):
            continue
        if has_trait(node.op, WIDENS_RANGE):
            precise.add(out)
            continue
        float_ins = [i for i in node.inputs if types[i].dtype in (FULL, HALF)]
        if has_trait(node.op, DTYPE_FROM_ATTR) and node.inputs and types[node.inputs[0]].dtype in INT_DTYPES | {"bool"}:
            precise.add(out)  # a cast of integer positions
        elif float_ins and any(i in precise for i in float_ins) and all(
                i in precise or _is_literal(producers.get(i)) for i in float_ins):
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
    taken = {p.name for p in fn.params} | {o.name for n in fn.nodes for o in n.outputs}

    def cast_node(src: str, dtype: str, cache: dict[str, str]) -> str:
        if src not in cache:
            name = base = f"{src}_{'h' if dtype == HALF else 'f'}"
            suffix = 0
            while name in taken:  # a user's value may already be called x_h
                suffix += 1
                name = f"{base}.{suffix}"
            taken.add(name)
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
            if (has_trait(node.op, WIDENS_RANGE) or keep_full) and dt == HALF:  # e.g. a scalar read by a precise op
                inputs.append(cast_node(i, FULL, widened))
            elif not keep_full and dt == FULL:  # a precise value or float32 constant meets fp16
                inputs.append(cast_node(i, HALF, casts))
            else:
                inputs.append(i)
        attrs = node.attr_dict
        if has_trait(node.op, DTYPE_FROM_ATTR) and attrs.get("dtype") == FULL and not keep_full:
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
    return fn.replace(params=tuple(params), nodes=tuple(nodes), results=tuple(results))


ACTIVATIONS_ATTR = "activations"  # module attribute: the narrow dtype once converted


def to_half(module: Module) -> Module:
    """The module with float16 activations and weights (see the module docstring), marked with
    the module attribute ``activations = "float16"``."""
    new_tensors: dict[str, np.ndarray] = {}
    functions = [_convert_function(fn, module.tensors, new_tensors) for fn in module.functions]
    return module.replace(functions=tuple(functions), tensors=module.tensors.with_tensors(new_tensors),
                          attrs={**dict(module.attrs), ACTIVATIONS_ATTR: HALF})


@register_pass
@dataclass(frozen=True)
class HalfPrecision(Pass):
    """float32 activations and weights to ``dtype``, float32 kept where needed (see module doc).
    A module already converted (module attribute ``activations``) is returned unchanged: the
    float32 values the first run keeps would be narrowed by a second (e.g. a user's
    ``--pass half-precision`` before tvm-cuda's own lower phase)."""

    name = "half-precision"
    idempotent = True
    dtype: str = HALF

    def apply(self, module: Module) -> Module:
        if self.dtype not in NARROW_DTYPES:
            raise PassError(f"half-precision: dtype must be one of {NARROW_DTYPES}, got {self.dtype!r}")
        if module.attr(ACTIVATIONS_ATTR) is not None:
            return module
        return to_half(module)
