"""A tensor table whose entries may be known by name, shape, dtype and sha256 only.

The IR text lists constants without data. ``parse_module(text, declared_only=True)`` gives a
module whose table declares them: passes that only move nodes (cse, dce, ...) see every name,
type and hash they need, while reading a declared entry's data raises
:class:`TensorDataUnavailableError` instead of inventing values. Data added later (tensors a
pass creates, or data loaded for a declared entry with :meth:`DeclaredTensorTable.with_data`)
is held like in any ``TensorTable``.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import numpy as np

from ..errors import BitsmithError
from .graph import TensorInfo, TensorTable, sha256_of
from .types import IRTypeError, TensorType, dtype_of_numpy, numpy_dtype


class TensorDataUnavailableError(BitsmithError):
    """A constant's data was read, but only its name, shape, dtype and sha256 are known."""

    def __init__(self, info: TensorInfo) -> None:
        self.info = info
        super().__init__(f"constant {info.name!r} ({TensorType(info.shape, info.dtype)}) is known by shape "
                         f"and sha256 only: its data was not loaded (with `bitsmith opt`, give "
                         f"--tensors WEIGHTS.safetensors)")


class TensorDataMismatchError(BitsmithError):
    """Data given for a declared constant that is not what the IR text declares."""


class DeclaredTensorTable(TensorTable):
    """``TensorTable`` plus declared entries without data (see the module docstring).

    Iteration, ``in``, ``len``, ``info`` and equality cover every entry; ``table[name]`` of a
    declared entry raises TensorDataUnavailableError (not KeyError: the name is there).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray] | None = None,
                 declared: Iterable[TensorInfo] = (), known: TensorTable | None = None) -> None:
        super().__init__(tensors, known)
        self._declared: dict[str, TensorInfo] = {}
        for info in declared:
            if info.name in self._info:
                raise ValueError(f"tensor {info.name!r} is both declared and given with data")
            if not all(isinstance(d, int) for d in info.shape):
                raise ValueError(f"tensor {info.name!r}: a constant's shape must be static, got {info.shape}")
            numpy_dtype(info.dtype)  # refuses unknown dtypes
            self._declared[info.name] = info
            self._info[info.name] = info

    def __getitem__(self, name: str) -> np.ndarray:
        info = self._declared.get(name)
        if info is not None:
            raise TensorDataUnavailableError(info)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)

    def declared(self) -> tuple[TensorInfo, ...]:
        """The entries without data, by name."""
        return tuple(self._declared[n] for n in sorted(self._declared))

    def has_data(self, name: str) -> bool:
        return name in self._data

    def arrays(self) -> dict[str, np.ndarray]:
        """The entries that hold data (declared ones left out)."""
        return dict(self._data)

    def with_tensors(self, extra: Mapping[str, np.ndarray]) -> "DeclaredTensorTable":
        return DeclaredTensorTable({**self._data, **extra},
                                   [i for n, i in self._declared.items() if n not in extra], known=self)

    def subset(self, names: Iterable[str]) -> "DeclaredTensorTable":
        keep = set(names)
        return DeclaredTensorTable({n: a for n, a in self._data.items() if n in keep},
                                   [i for n, i in self._declared.items() if n in keep], known=self)

    def with_data(self, arrays: Mapping[str, np.ndarray], source: str = "the given data") -> "DeclaredTensorTable":
        """Gives declared entries their data, each checked against its declared dtype, shape and
        sha256 (TensorDataMismatchError naming the tensor and ``source`` otherwise). Names in
        ``arrays`` that the table does not declare are ignored."""
        loaded = {}
        for name, info in self._declared.items():
            if name not in arrays:
                continue
            arr = np.asarray(arrays[name])
            where = f"tensor {name!r} in {source}"
            try:
                got = TensorType(tuple(arr.shape), dtype_of_numpy(arr.dtype))
            except IRTypeError as e:
                raise TensorDataMismatchError(f"{where}: {e}") from None
            if got != TensorType(info.shape, info.dtype):
                raise TensorDataMismatchError(f"{where} is {got}, but the IR text declares "
                                              f"{TensorType(info.shape, info.dtype)}")
            digest = sha256_of(arr)
            if digest != info.sha256:
                raise TensorDataMismatchError(f"{where} has sha256 {digest}, but the IR text declares "
                                              f"{info.sha256}: the data is not the one this IR was written with")
            loaded[name] = arr
        return self.with_tensors(loaded)

    def nbytes(self) -> int:
        declared = sum(math.prod(i.shape) * numpy_dtype(i.dtype).itemsize for i in self._declared.values())
        return super().nbytes() + declared

    def __repr__(self) -> str:
        return f"DeclaredTensorTable({len(self._data)} tensors with data, {len(self._declared)} declared only)"
