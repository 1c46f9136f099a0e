"""Lazy tensors: the values a fused kernel is built from.

A ``Lazy`` is a shape plus a function from indices to a TIR expression. Elementwise and
data-movement ops compose these functions (so a chain of them becomes one expression,
fused by construction); only reductions, values used more than once, and the kernel's
outputs are materialised with ``te.compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tvm import te, tirx

from ...ir.symbolic import Dim

Index = Sequence[Any]


@dataclass(frozen=True)
class Lazy:
    shape: tuple[Any, ...]  # TIR extents
    dims: tuple[Dim, ...]             # the same extents as IR dims (ints / symbolic strings)
    dtype: str
    at: Callable[[Index], tirx.PrimExpr]
    literal: float | int | bool | None = None  # a rank-0 literal (``scalar`` op), foldable

    @property
    def rank(self) -> int:
        return len(self.shape)


def from_tensor(t: te.Tensor, dims: Sequence[Dim]) -> Lazy:
    if len(t.shape) == 0:
        return Lazy((), tuple(dims), t.dtype, lambda idx: t())
    return Lazy(tuple(t.shape), tuple(dims), t.dtype, lambda idx: t(*idx))


def materialize(x: Lazy, name: str) -> tuple[te.Tensor, Lazy]:
    t = te.compute(x.shape, lambda *i: x.at(i), name=name)
    return t, from_tensor(t, x.dims)


def literal(value: float | int | bool, dtype: str) -> Lazy:
    c = tirx.const(value, dtype)
    return Lazy((), (), dtype, lambda idx: c, literal=value)
