"""The reference interpreter with its accumulating ops in float32 BLAS: the calibration runner
``numpy-fp32``.

Calibration needs the activations feeding every linear layer over tens of thousands of tokens;
the float64 GEMMs of the reference interpreter (its accuracy scheme, ``bitsmith.ir.interpreter``)
and tvm-llvm's decode-tuned kernels (its causal attention is not blocked for long prompts) both
leave most of a CPU's float32 throughput unused at 512-token windows. This runner overrides the
ops that carry the FLOPs -- ``linear``, ``qlinear``, ``bcq_linear``, ``matmul``, ``attention``
(causal attention computes only the key blocks a query block can see) and ``silu`` -- with
float32 numpy (sgemm) and keeps the reference rules for the rest. Results are float32
forward-pass values, like any compiled float32 target: they differ from the reference by
float32 summation error, not by an approximation (tests compare the Hessians).

There is no build step, so sequential calibration (one runner ``compile`` per stage segment)
costs nothing extra per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..ir import Module
from ..ir import bcq, quantized
from ..ir.interpreter import RULES, Impl, run_function
from ..passes.quantization.calibration import RunFn

# Query rows per attention block: a block of a causal prompt only multiplies the keys up to its
# last row (~5/8 of the full score matrix at 512 tokens, 4 blocks), in BLAS-sized pieces.
ATTENTION_BLOCK = 128


def _float32(*arrays: np.ndarray) -> bool:
    return all(a.dtype == np.float32 for a in arrays)


def _affine(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = np.matmul(x, weight.T)
    if bias is not None:
        y += bias
    return y


def _linear(xs, node, ctx):
    if not _float32(*xs):
        return RULES["linear"](xs, node, ctx)
    return [_affine(xs[0], xs[1], xs[2] if len(xs) == 3 else None)]


def _decoded(cache, op: str, weight_operands) -> Impl:
    """A quantized linear op as a float32 product with its decoded weight (decoded once per
    layer by the op's own reference decode cache); ``weight_operands(xs, attrs)`` picks the
    operands the decoder takes, the bias is the last operand when ``attrs["bias"]``."""
    def impl(xs, node, ctx):
        if xs[0].dtype != np.float32:
            return RULES[op](xs, node, ctx)
        attrs = node.attr_dict
        weight = cache.get(attrs, weight_operands(xs, attrs))
        return [_affine(xs[0], weight, xs[-1].astype(np.float32, copy=False) if attrs["bias"] else None)]
    return impl


def _matmul(xs, node, ctx):
    if not _float32(*xs):
        return RULES["matmul"](xs, node, ctx)
    return [np.matmul(xs[0], xs[1])]


def _silu(xs, node, ctx):
    x = xs[0]
    if x.dtype != np.float32:
        return RULES["silu"](xs, node, ctx)
    with np.errstate(over="ignore"):  # exp(-x) = inf for very negative x: silu's limit 0
        return [x / (np.float32(1) + np.exp(-x))]


def causal_attention_fp32(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool,
                          key_mask: np.ndarray | None = None, block: int = ATTENTION_BLOCK) -> np.ndarray:
    """``bitsmith.ir.interpreter.causal_attention``'s meaning (grouped-query heads, causal mask
    aligned to the end of the keys, ``key_mask``, all-hidden rows give zeros) in float32, one
    block of ``block`` query rows at a time over only the keys that block can see."""
    b, hq, s, d = q.shape
    hk, t, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    q5 = q.reshape(b, hk, g, s, d)
    kt = np.ascontiguousarray(np.swapaxes(k, -1, -2))  # [b, hk, d, t]
    hidden = None if key_mask is None else np.asarray(key_mask).reshape(b, 1, 1, t) == 0
    out = np.zeros((b, hk, g, s, dv), dtype=np.float32)
    for s0 in range(0, s, block):
        s1 = min(s, s0 + block)
        rows = s1 - s0
        end = min(t, s1 + t - s) if causal else t  # keys past the block's last row stay hidden
        if end <= 0:
            continue  # no query of the block sees a key: zeros
        qb = (q5[:, :, :, s0:s1] * np.float32(scale)).reshape(b, hk, g * rows, d)
        scores = np.matmul(qb, kt[..., :end])  # [b, hk, g*rows, end]
        if causal:
            allowed = np.arange(end)[None, :] <= np.arange(s0, s1)[:, None] + (t - s)
            scores.reshape(b, hk, g, rows, end)[...] += np.where(allowed, np.float32(0), np.float32(-np.inf))
        if hidden is not None:
            scores[np.broadcast_to(hidden[..., :end], scores.shape)] = -np.inf
        m = scores.max(axis=-1, keepdims=True)
        m[~np.isfinite(m)] = 0
        scores -= m
        np.exp(scores, out=scores)
        den = scores.sum(axis=-1, keepdims=True)
        den[den == 0] = np.inf
        scores /= den
        out[:, :, :, s0:s1] = np.matmul(scores, v[:, :, :end]).reshape(b, hk, g, rows, dv)
    return out.reshape(b, hq, s, dv)


def _attention(xs, node, ctx):
    if not _float32(*xs[:3]):
        return RULES["attention"](xs, node, ctx)
    mask = xs[3] if len(xs) == 4 else None
    return [causal_attention_fp32(*xs[:3], node.attr("scale"), bool(node.attr("causal")), mask)]


FLOAT32_RULES: Mapping[str, Impl] = {
    "linear": _linear,
    "qlinear": _decoded(quantized.DECODE_CACHE, "qlinear",
                        lambda xs, attrs: xs[1:len(xs) - (1 if attrs["bias"] else 0)]),
    bcq.OP: _decoded(bcq.DECODE_CACHE, bcq.OP, lambda xs, attrs: xs[1:3]),
    "matmul": _matmul,
    "attention": _attention,
    "silu": _silu,
}


@dataclass(frozen=True)
class Float32BlasRunner:
    """A :class:`~bitsmith.passes.quantization.calibration.CalibrationRunner`: the module's
    ``main`` through the interpreter with :data:`FLOAT32_RULES`."""

    name: str = "numpy-fp32"

    def compile(self, module: Module) -> RunFn:
        return lambda args: run_function(module, "main", args, overrides=FLOAT32_RULES)
