"""How close two runs of the same module must agree: the declaration a backend makes about its
numerics (``Backend.tolerance``) and the yardstick the conformance checks measure with.

Elementwise, like ``numpy.isclose`` plus a term for errors that scale with the whole result
(activations rounded to a grid set by their block's largest value, fp16 kernels):
``|got - want| <= atol + rtol * |want| + scale_rtol * max|want|`` (max over the finite
elements of that result), with NaN only where the oracle has NaN and infinities equal in sign. Integer and boolean results must be
equal exactly, whatever the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """``rtol``/``atol``/``scale_rtol`` of float results against the reference interpreter."""

    rtol: float
    atol: float
    scale_rtol: float = 0.0

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and self.scale_rtol >= 0):
            raise ValueError(f"tolerances must be >= 0, got {self}")

    def __str__(self) -> str:
        scaled = f" scale_rtol={self.scale_rtol:g}" if self.scale_rtol else ""
        return f"rtol={self.rtol:g} atol={self.atol:g}{scaled}"

    def mismatch(self, got: np.ndarray, want: np.ndarray) -> str | None:
        """None when ``got`` agrees with ``want``; else what differs, worst element first."""
        got, want = np.asarray(got), np.asarray(want)
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{got.dtype}{list(got.shape)} where {want.dtype}{list(want.shape)} was expected"
        if want.dtype.kind not in "fc":
            bad = got != want
            if bad.any():
                i = np.unravel_index(int(np.argmax(bad)), bad.shape)
                return f"{int(bad.sum())} of {bad.size} elements differ; at {list(i)} got {got[i]}, want {want[i]}"
            return None
        g, w = got.astype(np.float64), want.astype(np.float64)
        finite = np.abs(w[np.isfinite(w)])
        atol = self.atol + self.scale_rtol * (float(finite.max()) if finite.size else 0.0)
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(g - w)
            ok = (err <= atol + self.rtol * np.abs(w)) & np.isfinite(g) & np.isfinite(w)
            ok |= g == w  # equal infinities
            ok |= np.isnan(g) & np.isnan(w)
            if ok.all():
                return None
            excess = np.where(ok, -np.inf, np.nan_to_num(err - self.rtol * np.abs(w), nan=np.inf, posinf=np.inf))
        i = np.unravel_index(int(np.argmax(excess)), excess.shape)
        return (f"{int((~ok).sum())} of {ok.size} elements outside {self}; "
                f"worst at {list(i)}: got {g[i]!r}, want {w[i]!r} (|diff| {err[i]:.3g})")

    def compare(self, got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> str | None:
        """``mismatch`` over a function's results; also catches a wrong result count."""
        if len(got) != len(want):
            return f"{len(got)} results where {len(want)} were expected"
        for i, (g, w) in enumerate(zip(got, want)):
            why = self.mismatch(g, w)
            if why is not None:
                return f"result {i}: {why}"
        return None


def max_errors(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> tuple[float, float]:
    """(largest |got - want|, largest |got - want| / |want| over |want| > 0) of the finite float
    elements: what a backend measures to choose the Tolerance it declares."""
    abs_err = rel_err = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        finite = np.isfinite(g) & np.isfinite(w)
        if not finite.any():
            continue
        d = np.abs(g[finite] - w[finite])
        abs_err = max(abs_err, float(d.max()))
        nz = np.abs(w[finite]) > 0
        if nz.any():
            rel_err = max(rel_err, float((d[nz] / np.abs(w[finite][nz])).max()))
    return abs_err, rel_err
