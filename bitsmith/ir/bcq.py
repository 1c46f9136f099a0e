"""The binary-coded linear op ``bcq_linear`` (ShiftAddLLM, You et al., NeurIPS 2024).

A weight [out, in] is stored as ``bits`` planes of signs and per-plane, per-group scales:
``W[n, k] = sum_i alpha_i[n, k // group_size] * s_i[n, k]`` with ``s_i`` in {-1, +1}. With
``scale = "pow2"`` every alpha is a power of two, so a product by it is a shift (an exponent
add in floating point); ``"apot2"`` allows a sum of two powers of two; ``"fp16"`` is plain BCQ.

Operands, in order:
  x [..., in] (float32 or float16),
  planes u8 [bits, out, ceil(in / 8)]: bit ``k % 8`` (LSB first) of byte ``k // 8`` of row ``n``
      of plane ``i`` is 1 where ``s_i[n, k] = +1`` (0: -1); padding bits past ``in`` are 0,
  scales, one of
      pow2:  exponents i8 [bits, out, groups]       alpha = 2**e,
      apot2: exponents i8 [bits, out, groups, 2]    alpha = 2**e0 + 2**e1,
      fp16:  alphas f16 [bits, out, groups]          alpha as stored,
      where an exponent of -128 (``ZERO_EXPONENT``) stands for a zero term,
  offsets i8 [out, groups] (``offset`` attribute, optional, default false): the group's offset
      in units of its last plane's scale, ``z[n, g] = c[n, g] * alpha_{bits-1}[n, g]``,
  bias [out] in x's dtype (``bias`` attribute).
``groups = ceil(in / group_size)``; the last group of a row may be shorter.

With an offset, ``W[n, k] = z[n, k // group_size] + sum_i alpha_i * s_i``: a ±1 code with a
zero point, so a group keeps an exact level 0 and all ``2^bits`` levels (without one, SmolLM2
does not survive the power-of-two fit, docs/shiftadd.md). It costs one product per group and
row, ``c * alpha_last * sum_k x_k``, not one per plane; with pow2 scales ``alpha_last`` is a
shift and ``c`` a small integer.

Meaning (the reference interpreter's): the weight is the exact sum rounded once to float32,
then ``x @ W.T (+ bias)`` under the interpreter's accuracy scheme (float64 products and sums).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from . import symbolic as sym
from .code_packing import group_count, group_index
from .graph import Function, Module, Node
from .interpreter import rule, wide, wide_matmul
from .ops import register_op
from .quantized import _DecodeCache
from .traits import CONTRACTION, LINEAR_LIKE, PURE, QUANTIZED
from .types import IRTypeError, TensorType

OP = "bcq_linear"
BCQ_ATTRS = ("bias", "bits", "group_size", "in_features", "out_features", "scale")
BCQ_OPTIONAL_ATTRS = ("offset",)  # absent means false
SCALE_KINDS = ("pow2", "apot2", "fp16")
PLANE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)  # planes the op accepts; the shiftadd pass fits 2..4
ZERO_EXPONENT = -128  # an exponent that stands for a zero scale term
SHIFTADD_QUANTS = ("shiftadd-w2", "shiftadd-w3", "shiftadd-w4", "shiftadd-auto")


def plane_bytes(in_features: int) -> int:
    return (in_features + 7) // 8


def has_offset(attrs: dict) -> bool:
    return bool(attrs.get("offset", False))


def operand_types(attrs: dict) -> list[tuple[str, TensorType]]:
    """The (role, type) of the planes, scales and (``offset``) offsets operands (after x, before bias)."""
    types = _plane_and_scale_types(attrs)
    if has_offset(attrs):
        types.append(("offsets", TensorType((attrs["out_features"], group_count(attrs["in_features"],
                                                                                  attrs["group_size"])), "int8")))
    return types


def _plane_and_scale_types(attrs: dict) -> list[tuple[str, TensorType]]:
    bits, k, n, gs, scale = (attrs[a] for a in ("bits", "in_features", "out_features", "group_size", "scale"))
    for name, v in (("bits", bits), ("in_features", k), ("out_features", n), ("group_size", gs)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise IRTypeError(f"{OP}: {name} must be a positive int, got {v!r}")
    if bits not in PLANE_BITS:
        raise IRTypeError(f"{OP}: bits must be in 1..8, got {bits}")
    if scale not in SCALE_KINDS:
        raise IRTypeError(f"{OP}: scale must be one of {', '.join(SCALE_KINDS)}, got {scale!r}")
    g = group_count(k, gs)
    planes = ("planes", TensorType((bits, n, plane_bytes(k)), "uint8"))
    if scale == "pow2":
        return [planes, ("exponents", TensorType((bits, n, g), "int8"))]
    if scale == "apot2":
        return [planes, ("exponents", TensorType((bits, n, g, 2), "int8"))]
    return [planes, ("alphas", TensorType((bits, n, g), "float16"))]


@register_op(OP, (3, 5), attrs=BCQ_ATTRS, optional=BCQ_OPTIONAL_ATTRS,
             doc="x @ (sum_i alpha_i * signs_i).T (+ bias), binary-coded weights; see bitsmith/ir/bcq.py",
             traits=(PURE, CONTRACTION, LINEAR_LIKE, QUANTIZED))
def _infer_bcq_linear(types: tuple[TensorType, ...], attrs: dict) -> tuple[TensorType, ...]:
    x = types[0]
    if x.dtype not in ("float32", "float16"):
        raise IRTypeError(f"{OP}: activations must be float32 or float16, got {x.dtype}")
    if x.rank < 1 or not sym.dims_equal(x.shape[-1], attrs["in_features"]):
        raise IRTypeError(f"{OP}: input features {x.shape[-1:]} != in_features {attrs['in_features']}")
    for flag in ("bias", "offset"):
        if not isinstance(attrs.get(flag, False), bool):
            raise IRTypeError(f"{OP}: {flag} must be a bool, got {attrs[flag]!r}")
    expected = operand_types(attrs)
    want_count = 1 + len(expected) + (1 if attrs["bias"] else 0)
    if len(types) != want_count:
        raise IRTypeError(f"{OP}: expected {want_count} operands (x, {', '.join(r for r, _ in expected)}"
                          f"{', bias' if attrs['bias'] else ''}), got {len(types)}")
    for (role, want), got in zip(expected, types[1:]):
        if got != want:
            raise IRTypeError(f"{OP}: operand {role} has type {got}, expected {want} "
                              f"(scale kind {attrs['scale']})")
    if attrs["bias"] and types[-1] != TensorType((attrs["out_features"],), x.dtype):
        raise IRTypeError(f"{OP}: bias must be {x.dtype}[{attrs['out_features']}], got {types[-1]}")
    return (TensorType(x.shape[:-1] + (attrs["out_features"],), x.dtype),)


# ---------------------------------------------------------------- storage

def pack_planes(signs: np.ndarray) -> np.ndarray:
    """uint8 [bits, out, ceil(in/8)] from signs in {-1, +1} [bits, out, in] (LSB first)."""
    signs = np.asarray(signs)
    if signs.ndim != 3:
        raise ValueError(f"signs must be [bits, out, in], got shape {signs.shape}")
    if signs.size and not np.isin(signs, (-1, 1)).all():
        raise ValueError("signs must hold only -1 and +1")
    return np.packbits(signs > 0, axis=-1, bitorder="little")


def unpack_planes(planes: np.ndarray, in_features: int) -> np.ndarray:
    """int8 signs in {-1, +1} [bits, out, in]; inverse of :func:`pack_planes`."""
    bits01 = np.unpackbits(np.asarray(planes, dtype=np.uint8), axis=-1, count=in_features, bitorder="little")
    return (bits01.astype(np.int8) * 2 - 1).astype(np.int8)


def exponent_values(exponents: np.ndarray) -> np.ndarray:
    """float64 2**e of int8 exponents, 0 where e is ``ZERO_EXPONENT`` (exact)."""
    e = np.asarray(exponents).astype(np.int64)
    return np.where(e == ZERO_EXPONENT, 0.0, np.ldexp(1.0, np.where(e == ZERO_EXPONENT, 0, e)))


def alphas(attrs: dict, scales: np.ndarray) -> np.ndarray:
    """float64 alpha [bits, out, groups] from the scales operand (exact for every kind)."""
    scale = attrs["scale"]
    if scale == "pow2":
        return exponent_values(scales)
    if scale == "apot2":
        terms = exponent_values(scales)
        return terms[..., 0] + terms[..., 1]
    return np.asarray(scales).astype(np.float64)


def dequantize(attrs: dict, operands: Sequence[np.ndarray]) -> np.ndarray:
    """The float32 [out, in] weight that a bcq_linear's planes and scales stand for: the exact
    sum over planes (float64: at most 8 terms of powers of two or fp16 values), rounded once."""
    k, gs = attrs["in_features"], attrs["group_size"]
    planes, scales = operands[0], operands[1]
    signs = unpack_planes(planes, k).astype(np.float64)
    a = alphas(attrs, scales)[:, :, group_index(k, gs)]  # [bits, out, in]
    w = (a * signs).sum(axis=0)
    if has_offset(attrs):  # c * alpha_last: |c| < 2^8 times a (sum of two) power(s) of two or an fp16: exact
        w += np.asarray(operands[2]).astype(np.float64)[:, group_index(k, gs)] * a[-1]
    return w.astype(np.float32)


def check_scales(attrs: dict, scales: np.ndarray) -> None:
    """Data-level check a fit's result must pass before it is stored: no NaN/inf or negative
    fp16 alphas; exponents in [-126, 127] or the zero sentinel (2**e exact in float32)."""
    s = np.asarray(scales)
    if attrs["scale"] == "fp16":
        if not np.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{OP}: fp16 alphas must be finite and >= 0")
        return
    bad = (s != ZERO_EXPONENT) & ((s < -126) | (s > 127))
    if bad.any():
        raise ValueError(f"{OP}: exponents must lie in [-126, 127] (or {ZERO_EXPONENT} for a zero term), "
                         f"got {int(s[bad].flat[0])}")


def storage_bits_per_weight(attrs: dict) -> float:
    """Bits stored per weight: every byte of the planes and scales operands (row padding of the
    planes included), never the bias."""
    stored = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for _, t in operand_types(attrs))
    return 8.0 * stored / (attrs["in_features"] * attrs["out_features"])


def quant_label(attrs: dict) -> str:
    """A short name of the format, e.g. "shiftadd-w3" (plus the scale kind unless pow2)."""
    return (f"shiftadd-w{attrs['bits']}" + ("" if attrs["scale"] == "pow2" else f"-{attrs['scale']}")
            + ("-offset" if has_offset(attrs) else ""))


# ---------------------------------------------------------------- reference meaning

DECODE_CACHE = _DecodeCache(decode=dequantize)  # each layer's planes decoded once per process


@rule(OP)
def _bcq_linear_rule(xs, node, ctx):
    attrs = node.attr_dict
    x = xs[0]
    weight = DECODE_CACHE.get(attrs, xs[1:1 + len(operand_types(attrs))])
    y = wide_matmul(x, weight.T)
    if attrs["bias"]:
        y += wide(xs[-1])
    return [y.astype(x.dtype, copy=False)]


def bcq_nodes(module: Module) -> Iterator[tuple[Function, Node]]:
    for fn in module.functions:
        for node in fn.nodes:
            if node.op == OP:
                yield fn, node


def bits_per_layer(module: Module) -> dict[str, int]:
    """{module path (or output value name): planes} of every bcq_linear, in node order."""
    out: dict[str, int] = {}
    for _, node in bcq_nodes(module):
        key = node.loc.module_path if node.loc and node.loc.module_path else node.output.name
        out[key] = int(node.attr("bits"))
    return out
