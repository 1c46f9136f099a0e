"""Quantization grids and the schemes built from them (which value grids a weight group may use).

A grid is a set of integer values; a weight group stores one code per weight (an index
into the grid) and one fp16 scale, so a weight is ``grid[code] * scale`` (asymmetric integer
grids add a per-group zero point: ``(code - zero) * scale``). A scheme lists the candidate
grids a group may choose from; with more than one, a per-group selector says which.

Grids follow BitMoD (Chen et al., HPCA 2025): FP3 = {0, ±1, ±2, ±4} and FP4 (E2M1 on an
integer scale) = {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12} waste one code on a negative zero; the
BitMoD types spend it on one extra value, +-3 ("extra resolution", ER) or +-6 ("extra
asymmetry", EA) for FP3, +-10 (ER) or +-16 (EA) for FP4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    name: str
    bits: int
    values: tuple[int, ...]  # code i means values[i]; at most 2**bits entries

    def __post_init__(self) -> None:
        if len(self.values) > 1 << self.bits:
            raise ValueError(f"grid {self.name}: {len(self.values)} values do not fit {self.bits} bits")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"grid {self.name}: repeated values")

    @property
    def max_abs(self) -> int:
        return max(abs(v) for v in self.values)

    def array(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float32)


def _fp(name: str, bits: int, base: tuple[int, ...], extra: int | None = None) -> Grid:
    vals = sorted(set(base) | {-v for v in base}) + ([extra] if extra is not None else [])
    return Grid(name, bits, tuple(vals))


FP3_BASE = (0, 1, 2, 4)
FP4_BASE = (0, 1, 2, 3, 4, 6, 8, 12)

GRIDS: dict[str, Grid] = {}


def _add(g: Grid) -> Grid:
    GRIDS[g.name] = g
    return g


for _k in (2, 3, 4):
    _add(Grid(f"uint{_k}", _k, tuple(range(1 << _k))))  # asymmetric: used with a zero point
    _add(Grid(f"int{_k}-sym", _k, tuple(range(-(1 << (_k - 1)) + 1, 1 << (_k - 1)))))
_add(_fp("fp3", 3, FP3_BASE))
_add(_fp("fp4", 4, FP4_BASE))
for _sign, _s in (("+", 1), ("-", -1)):
    _add(_fp(f"fp3-er{_sign}", 3, FP3_BASE, 3 * _s))
    _add(_fp(f"fp3-ea{_sign}", 3, FP3_BASE, 6 * _s))
    _add(_fp(f"fp4-er{_sign}", 4, FP4_BASE, 10 * _s))
    _add(_fp(f"fp4-ea{_sign}", 4, FP4_BASE, 16 * _s))


@dataclass(frozen=True)
class Scheme:
    """A weight format: candidate grids (ties go to the first), asymmetric or not.

    Formats taken from a file rather than fitted (the ``gguf-*`` schemes) may store float32
    scales (``scale_dtype``), a float per-group ``offsets`` operand added after scaling
    (``w = grid[code] * scale + offset``) and fix the group size (``block_size``)."""

    name: str
    candidates: tuple[Grid, ...]
    asymmetric: bool = False
    scale_dtype: str = "float16"
    offsets: bool = False
    block_size: int | None = None

    @property
    def bits(self) -> int:
        return self.candidates[0].bits

    @property
    def selector_bits(self) -> int:
        return math.ceil(math.log2(len(self.candidates))) if len(self.candidates) > 1 else 0


SCHEMES: dict[str, Scheme] = {}
for _k in (2, 3, 4):
    SCHEMES[f"rtn-int{_k}"] = Scheme(f"rtn-int{_k}", (GRIDS[f"uint{_k}"],), asymmetric=True)
    SCHEMES[f"rtn-int{_k}-sym"] = Scheme(f"rtn-int{_k}-sym", (GRIDS[f"int{_k}-sym"],))
SCHEMES["fp3"] = Scheme("fp3", (GRIDS["fp3"],))
SCHEMES["fp4"] = Scheme("fp4", (GRIDS["fp4"],))
for _w, _p in ((3, "fp3"), (4, "fp4")):
    SCHEMES[f"bitmod-w{_w}"] = Scheme(
        f"bitmod-w{_w}", tuple(GRIDS[f"{_p}-{kind}{sign}"] for kind in ("er", "ea") for sign in "+-"))


def register_scheme(scheme: Scheme) -> Scheme:
    """Adds a scheme under its name; passes that define new weight formats call this from their
    own module instead of editing this one."""
    if scheme.name in SCHEMES and SCHEMES[scheme.name] != scheme:
        raise ValueError(f"quantization scheme {scheme.name!r} registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


def fitted_schemes() -> dict[str, Scheme]:
    """The schemes the ``quantize`` pass fits to float weights: all but a file's own fixed
    formats (``block_size`` set, e.g. the ``gguf-*`` schemes, which only ``gguf-quantize`` makes)."""
    return {name: s for name, s in SCHEMES.items() if s.block_size is None}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; valid: {', '.join(SCHEMES)}") from None
