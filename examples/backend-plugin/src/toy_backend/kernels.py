"""The toy target's kernels: one numpy function per IR op, all in float32.

Unlike bitsmith's reference interpreter (which widens sums to float64 and rounds once), these
compute in the input's own precision, so results differ from the oracle by float32 rounding:
the tolerance ``ToyBackend.tolerance`` declares covers exactly that.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

Kernel = Callable[[Sequence[np.ndarray], Mapping[str, Any], Callable[[Any], int]], np.ndarray]
"""kernel(inputs, attrs, dim): ``dim`` turns a (possibly symbolic) dim of the attrs into an int."""

_erf = np.vectorize(math.erf, otypes=[np.float64])

UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg": np.negative, "abs": np.abs, "exp": np.exp, "log": np.log, "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x), "reciprocal": lambda x: 1 / x, "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "silu": lambda x: x / (1 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0), "sin": np.sin, "cos": np.cos, "erf": _erf,
    "logical_not": np.logical_not,
}
BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "eq": np.equal, "ne": np.not_equal,
    "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or,
}
REDUCE = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0))
    return e / np.sum(e, axis=axis, keepdims=True)


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _layer_norm(xs: Sequence[np.ndarray], eps: float) -> np.ndarray:
    x = xs[0]
    mean = x.mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return y * xs[1] + xs[2] if len(xs) == 3 else y


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool) -> np.ndarray:
    """Grouped-query attention: query head h reads key/value head h // (heads_q // heads_kv)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scores = (q @ np.swapaxes(k, -1, -2)) * np.float32(scale)
    if causal:  # query i of s sees keys up to i + (t - s): the cache holds t - s earlier ones
        s, t = q.shape[2], k.shape[2]
        scores = np.where(np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s), scores, -np.inf)
    return _softmax(scores, -1) @ v


def _slice(x: np.ndarray, axis: int, start: int, end: int, step: int) -> np.ndarray:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


KERNELS: dict[str, Kernel] = {
    **{op: (lambda f: lambda xs, a, dim: f(xs[0]))(f) for op, f in UNARY.items()},
    **{op: (lambda f: lambda xs, a, dim: f(xs[0], xs[1]))(f) for op, f in BINARY.items()},
    **{op: (lambda f: lambda xs, a, dim: f(xs[0], axis=tuple(a["axes"]), keepdims=bool(a["keepdims"])))(f)
       for op, f in REDUCE.items()},
    "scalar": lambda xs, a, dim: np.array(a["value"], dtype=a["dtype"]),
    "arange": lambda xs, a, dim: np.arange(dim(a["start"]), dim(a["end"]), a["step"], dtype=a["dtype"]),
    "gelu": lambda xs, a, dim: _gelu(xs[0], a["approximate"]),
    "where": lambda xs, a, dim: np.where(xs[0], xs[1], xs[2]),
    "cast": lambda xs, a, dim: xs[0].astype(a["dtype"]),
    "softmax": lambda xs, a, dim: _softmax(xs[0], a["axis"]),
    "matmul": lambda xs, a, dim: xs[0] @ xs[1],
    "linear": lambda xs, a, dim: xs[0] @ xs[1].T + (xs[2] if len(xs) == 3 else 0),
    "embedding": lambda xs, a, dim: xs[0][xs[1]],
    "layer_norm": lambda xs, a, dim: _layer_norm(xs, a["eps"]),
    "attention": lambda xs, a, dim: _attention(xs[0], xs[1], xs[2], a["scale"], bool(a["causal"])),
    "reshape": lambda xs, a, dim: xs[0].reshape([dim(d) for d in a["shape"]]),
    "permute": lambda xs, a, dim: np.transpose(xs[0], a["perm"]),
    "expand": lambda xs, a, dim: np.broadcast_to(xs[0], [dim(d) for d in a["shape"]]),
    "slice": lambda xs, a, dim: _slice(xs[0], a["axis"], dim(a["start"]), dim(a["end"]), a["step"]),
    "concat": lambda xs, a, dim: np.concatenate(xs, axis=a["axis"]),
}
