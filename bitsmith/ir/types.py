"""Tensor types: a shape of (possibly symbolic) dims and a scalar dtype name."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .symbolic import Dim, canonical, evaluate, SYMBOL_NAME
from typing import Mapping

# Scalar dtypes the IR knows, with their short printed names and numpy equivalents.
DTYPES: dict[str, tuple[str, np.dtype]] = {
    "float32": ("f32", np.dtype(np.float32)),
    "float16": ("f16", np.dtype(np.float16)),
    "float64": ("f64", np.dtype(np.float64)),
    "int64": ("i64", np.dtype(np.int64)),
    "int32": ("i32", np.dtype(np.int32)),
    "int8": ("i8", np.dtype(np.int8)),
    "uint8": ("u8", np.dtype(np.uint8)),
    "bool": ("i1", np.dtype(np.bool_)),
}
SHORT_TO_DTYPE = {short: name for name, (short, _) in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "float64"})
INT_DTYPES = frozenset({"int64", "int32", "int8", "uint8"})


class IRTypeError(TypeError):
    """A type that is malformed or does not fit where it is used."""


def numpy_dtype(dtype: str) -> np.dtype:
    try:
        return DTYPES[dtype][1]
    except KeyError:
        raise IRTypeError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


def dtype_of_numpy(dt: np.dtype) -> str:
    for name, (_, npdt) in DTYPES.items():
        if npdt == np.dtype(dt):
            return name
    raise IRTypeError(f"numpy dtype {dt} has no IR dtype")


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise IRTypeError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        shape = tuple(canonical(d) for d in self.shape)
        for d in shape:
            if isinstance(d, int) and d < 0:
                raise IRTypeError(f"negative dimension {d} in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def concrete(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(evaluate(d, bindings) for d in self.shape)

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{DTYPES[self.dtype][0]}[{dims}]"


def is_symbol_name(name: str) -> bool:
    return bool(SYMBOL_NAME.match(name))
