"""The gather op ``qembedding``: rows of a packed weight, so a table tied to a quantized lm_head
is stored once, as the lm_head's codes (issue 15: tied weights quantized once and shared).

Operands: the packed weight operands of a ``qlinear`` with the same attributes (``codes``,
``scales``, and ``zeros`` / ``offsets`` / ``selectors`` as the scheme needs; see
``quantized.operand_types``), then the integer ids. Attributes are the qlinear's; the table is
[out_features, in_features] and the result ``ids.shape + (in_features,)`` float32. A row reads
exactly the values ``quantized.dequantize`` gives for it, so every target gathers the same
numbers (llama.cpp likewise gathers the GGUF's Q8_0 rows of a tied ``token_embd``). Sparse or
outlier weights are not gathered (the passes that make this op never tie them).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .interpreter import InterpreterError, rule
from .ops import register_op
from .quant_grids import get_scheme
from .quantized import QLINEAR_ATTRS, _dequantize_rows, operand_types
from .traits import PURE
from .types import INT_DTYPES, IRTypeError, TensorType


def gathered_rows(attrs: dict, operands: Sequence[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """float32 rows ``ids`` of the table the packed ``operands`` stand for (only those decoded)."""
    n = attrs["out_features"]
    flat = np.asarray(ids).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n):
        raise InterpreterError(f"token id out of range [0, {n}): min {flat.min()}, max {flat.max()}")
    roles = [r for r, _ in operand_types(attrs)]
    picked = {r: np.asarray(a)[flat] for r, a in zip(roles, operands)}
    rows = _dequantize_rows(attrs, get_scheme(attrs["scheme"]), picked) if flat.size else \
        np.zeros((0, attrs["in_features"]), np.float32)
    return rows.astype(np.float32, copy=False).reshape(tuple(np.shape(ids)) + (attrs["in_features"],))


@register_op("qembedding", (3, 6), attrs=tuple(sorted(QLINEAR_ATTRS)),
             doc="Rows of dequantize(packed weight) [out_features, in_features] gathered by integer ids "
                 "(the last operand); see bitsmith/ir/quantized_embedding.py",
             traits=(PURE,))
def _infer_qembedding(types: tuple[TensorType, ...], attrs: dict) -> tuple[TensorType, ...]:
    if attrs["sparsity"] or attrs["outliers"] or attrs["bias"]:
        raise IRTypeError("qembedding: sparse, outlier or biased weights are not gathered")
    expected = operand_types(attrs)
    *packed, ids = types
    if len(packed) != len(expected):
        raise IRTypeError(f"qembedding: {len(packed)} packed operands, scheme {attrs['scheme']} has "
                          f"{len(expected)} ({', '.join(r for r, _ in expected)})")
    for (role, want), got in zip(expected, packed):
        if got != want:
            raise IRTypeError(f"qembedding: operand {role} has type {got}, expected {want}")
    if ids.dtype not in INT_DTYPES:
        raise IRTypeError(f"qembedding: ids must be integers, got {ids.dtype}")
    return (TensorType(ids.shape + (attrs["in_features"],), "float32"),)


@rule("qembedding")
def _qembedding_rule(xs, node, ctx):
    return [gathered_rows(node.attr_dict, xs[:-1], xs[-1])]
