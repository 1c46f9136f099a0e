"""The quantized linear op ``qlinear``: its operands, type rule and reference meaning.

Operands, in order (optional ones present as the attributes say):
  x [..., in], codes u8 [out, packed(kept*bits)], scales f16 [out, groups] (f32 where the
  scheme's scale_dtype says), zeros u8 [out, groups]             (asymmetric schemes),
  offsets [out, groups], the scale's dtype   (schemes with offsets: w = grid[code]*scale + offset),
  selectors u8 [out, packed(groups*selector_bits)]   (schemes with several grids),
  nm_index u8 [out, packed(kept*log2 M)]             (``sparsity = "N:M"``),
  outlier_values f16 [nnz], outlier_cols i32 [nnz], outlier_rowptr i32 [out+1]  (CSR),
  bias [out].
``kept`` is ``in`` for dense weights and ``in / M * N`` under N:M sparsity; groups run along
the kept weights of a row, and the last group of a row may be shorter.
"""

from __future__ import annotations

import collections
import threading
import math
from typing import Any, Iterator, Sequence

import numpy as np

from . import symbolic as sym
from .graph import Function, Module, Node
from .quant_grids import get_scheme
from .code_packing import group_count, group_index, packed_length, unpack_codes
from .interpreter import rule, wide, wide_matmul
from .ops import register_op
from .traits import CONTRACTION, LINEAR_LIKE, PURE, QUANTIZED
from .types import IRTypeError, TensorType

QLINEAR_ATTRS = frozenset({"scheme", "group_size", "in_features", "out_features", "sparsity", "outliers", "bias"})


def parse_sparsity(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(p) for p in text.split(":"))
    except ValueError:
        raise IRTypeError(f"sparsity {text!r} is not N:M") from None
    if not 0 < n <= m or m & (m - 1):
        raise IRTypeError(f"sparsity {text!r}: need 0 < N <= M with M a power of two")
    return n, m


def kept_per_row(in_features: int, sparsity: str) -> int:
    nm = parse_sparsity(sparsity)
    if nm is None:
        return in_features
    n, m = nm
    if in_features % m:
        raise IRTypeError(f"sparsity {sparsity}: in_features {in_features} is not a multiple of {m}")
    return in_features // m * n


def operand_types(attrs: dict, x_dtype: str = "float32") -> list[tuple[str, TensorType]]:
    """The (role, type) of every operand after x, in order, for these attributes."""
    scheme = get_scheme(attrs["scheme"])
    k, n, gs = attrs["in_features"], attrs["out_features"], attrs["group_size"]
    if not (isinstance(k, int) and isinstance(n, int) and isinstance(gs, int) and k > 0 and n > 0 and gs > 0):
        raise IRTypeError("qlinear: in_features, out_features and group_size must be positive ints")
    if scheme.block_size is not None and gs != scheme.block_size:
        raise IRTypeError(f"qlinear: scheme {scheme.name} has groups of {scheme.block_size}, not {gs}")
    kept = kept_per_row(k, attrs["sparsity"])
    groups = group_count(kept, gs)
    out = [("codes", TensorType((n, packed_length(kept, scheme.bits)), "uint8")),
           ("scales", TensorType((n, groups), scheme.scale_dtype))]
    if scheme.asymmetric:
        out.append(("zeros", TensorType((n, groups), "uint8")))
    if scheme.offsets:
        out.append(("offsets", TensorType((n, groups), scheme.scale_dtype)))
    if scheme.selector_bits:
        out.append(("selectors", TensorType((n, packed_length(groups, scheme.selector_bits)), "uint8")))
    nm = parse_sparsity(attrs["sparsity"])
    if nm is not None:
        out.append(("nm_index", TensorType((n, packed_length(kept, index_bits(nm[1]))), "uint8")))
    return out


def index_bits(m: int) -> int:
    return max(1, int(math.log2(m)))


@register_op("qlinear", (3, 11), attrs=tuple(sorted(QLINEAR_ATTRS)),
             doc="x @ dequantize(packed weight).T (+ bias); see bitsmith/ir/quantized.py",
             traits=(PURE, CONTRACTION, LINEAR_LIKE, QUANTIZED))
def _infer_qlinear(types: tuple[TensorType, ...], attrs: dict) -> tuple[TensorType, ...]:
    x = types[0]
    if x.dtype not in ("float32", "float16"):
        raise IRTypeError(f"qlinear: activations must be float, got {x.dtype}")
    if x.rank < 1 or not sym.dims_equal(x.shape[-1], attrs["in_features"]):
        raise IRTypeError(f"qlinear: input features {x.shape[-1:]} != in_features {attrs['in_features']}")
    expected = operand_types(attrs)
    rest = list(types[1:])
    for role, want in expected:
        if not rest:
            raise IRTypeError(f"qlinear: missing operand {role}")
        got = rest.pop(0)
        if got != want:
            raise IRTypeError(f"qlinear: operand {role} has type {got}, expected {want}")
    if attrs["outliers"]:
        if len(rest) < 3:
            raise IRTypeError("qlinear: outliers need values, cols and rowptr operands")
        vals, cols, ptr = rest[:3]
        rest = rest[3:]
        if vals.dtype != "float16" or cols.dtype != "int32" or ptr.dtype != "int32" or vals.rank != 1 \
                or cols.shape != vals.shape or ptr.shape != (attrs["out_features"] + 1,):
            raise IRTypeError(f"qlinear: bad outlier CSR operands {vals}, {cols}, {ptr}")
    if attrs["bias"]:
        if len(rest) != 1 or rest[0] != TensorType((attrs["out_features"],), x.dtype):
            raise IRTypeError(f"qlinear: bias must be {x.dtype}[{attrs['out_features']}]")
        rest = []
    if rest:
        raise IRTypeError(f"qlinear: {len(rest)} unexpected extra operands")
    return (TensorType(x.shape[:-1] + (attrs["out_features"],), x.dtype),)


DECODE_ROW_ELEMENTS = 1 << 21  # weights decoded together: bounded temporaries (a 7B lm_head is 131M weights)


def dequantize(attrs: dict, operands: Sequence[np.ndarray]) -> np.ndarray:
    """The dense float32 [out, in] weight that a qlinear's packed operands stand for."""
    scheme = get_scheme(attrs["scheme"])
    k, n = attrs["in_features"], attrs["out_features"]
    roles = [r for r, _ in operand_types(attrs)]
    ops = dict(zip(roles, operands))  # every role operand is [out, ...]: rows decode independently
    rest = list(operands[len(roles):])
    rows = max(1, DECODE_ROW_ELEMENTS // max(k, 1))
    weight = np.empty((n, k), dtype=np.float32)
    for i in range(0, n, rows):
        weight[i:i + rows] = _dequantize_rows(attrs, scheme, {r: a[i:i + rows] for r, a in ops.items()})
    if attrs["outliers"]:
        vals, cols, ptr = rest[:3]
        rows_of = np.repeat(np.arange(n), np.diff(ptr))
        weight[rows_of, cols] = vals.astype(np.float32)  # outliers replace the decoded value
    return weight


def _dequantize_rows(attrs: dict, scheme: Any, ops: dict[str, np.ndarray]) -> np.ndarray:
    k, gs = attrs["in_features"], attrs["group_size"]
    kept = kept_per_row(k, attrs["sparsity"])
    codes = unpack_codes(ops["codes"], scheme.bits, kept)
    gi = group_index(kept, gs)
    scale = ops["scales"].astype(np.float32)[:, gi]
    if scheme.asymmetric:
        values = (codes.astype(np.float32) - ops["zeros"].astype(np.float32)[:, gi]) * scale
    else:
        table = np.zeros((len(scheme.candidates), 1 << scheme.bits), dtype=np.float32)
        for i, g in enumerate(scheme.candidates):
            table[i, :len(g.values)] = g.values
        if scheme.selector_bits:
            sel = unpack_codes(ops["selectors"], scheme.selector_bits, group_count(kept, gs))[:, gi]
        else:
            sel = np.zeros_like(codes)
        values = table[sel, codes] * scale
    if scheme.offsets:  # one float32 rounding per weight, after the (exact) scaling
        values = values + ops["offsets"].astype(np.float32)[:, gi]
    nm = parse_sparsity(attrs["sparsity"])
    if nm is None:
        return values
    nn, m = nm
    idx = unpack_codes(ops["nm_index"], index_bits(m), kept).astype(np.int64)
    cols = (np.arange(kept) // nn) * m + idx  # block start + index inside the block
    weight = np.zeros((codes.shape[0], k), dtype=np.float32)
    np.put_along_axis(weight, cols, values, axis=1)
    return weight


class _DecodeCache:
    """Decoded weights of constant operands, so the reference target unpacks each layer once.

    Keyed by the identity of the operand arrays (constants from a module's read-only tensor
    table are the same objects every call); holds references so identities stay valid. Shared
    by every thread that runs a model: the dict is touched only under a lock, decoding runs
    outside it, and a layer two threads decoded at once is stored once.
    """

    def __init__(self, max_bytes: int = 3 << 30, decode=None) -> None:
        self.max_bytes = max_bytes
        self.decode = decode or dequantize  # another quantized op's decoder (bcq_linear)
        self.entries: collections.OrderedDict[tuple, tuple[list, np.ndarray]] = collections.OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def get(self, attrs: dict, operands: Sequence[np.ndarray]) -> np.ndarray:
        if any(a.flags.writeable for a in operands):  # not table constants: decode afresh
            return self.decode(attrs, operands)
        key = (tuple(sorted(attrs.items())),) + tuple(id(a) for a in operands)
        with self._lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit[1]
        weight = self.decode(attrs, operands)
        weight.flags.writeable = False  # shared between calls and threads
        with self._lock:
            hit = self.entries.get(key)
            if hit is not None:  # another thread decoded it meanwhile: keep one copy
                self.entries.move_to_end(key)
                return hit[1]
            self.entries[key] = (list(operands), weight)
            self.bytes += weight.nbytes
            while self.bytes > self.max_bytes and len(self.entries) > 1:
                _, (_, old) = self.entries.popitem(last=False)
                self.bytes -= old.nbytes
        return weight

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.bytes = 0


DECODE_CACHE = _DecodeCache()


@rule("qlinear")
def _qlinear_rule(xs, node, ctx):
    attrs = node.attr_dict
    x = xs[0]
    n_weight = len(xs) - 1 - (1 if attrs["bias"] else 0)
    weight = DECODE_CACHE.get(attrs, xs[1:1 + n_weight])
    # the float32 decoded weight exactly, products and sums in float64, one rounding to x's
    # dtype (the interpreter's accuracy scheme; float16 activations do not round the weight)
    y = wide_matmul(x, weight.T)
    if attrs["bias"]:
        y += wide(xs[-1])
    return [y.astype(x.dtype, copy=False)]


def qlinear_nodes(module: Module) -> Iterator[tuple[Function, Node, dict[str, str]]]:
    """Every qlinear node of every function, with a map from that function's values to the
    tensor-table names of the constants behind them (where a backend or report finds weights)."""
    for fn in module.functions:
        constants = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
        for node in fn.nodes:
            if node.op == "qlinear":
                yield fn, node, constants
