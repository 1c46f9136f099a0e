"""A tensor table whose large entries are produced on demand instead of held.

A 7B model's fp32 weights are 27 GB: more than the machines we compile on. Its compile only
ever needs one weight at a time (the quantize pass packs a linear's weight and drops it), so
the capture puts the weights in a ``ProvidedTensorTable``: each provided entry is known by
name, shape and dtype, and reading it asks the ``source`` (e.g. a seeded generator, or a
reader over a checkpoint file) for a fresh array that nothing keeps. Tensors that passes add
(packed codes, scales) are held as in any ``TensorTable``.

The sha256 of a provided entry is computed only when something asks for it (the IR text,
the artifact's tensor table, table equality), once, by reading it one more time; shapes and
dtypes (``tensor_type``, what the verifier and rewriters ask) never read data. The source
must give the same bytes every time (a mismatch of shape or dtype is refused on read).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .graph import TensorInfo, TensorTable, sha256_of
from .types import TensorType, dtype_of_numpy

TensorSource = Callable[[str], np.ndarray]


class ProvidedTensorMismatchError(ValueError):
    """The source returned an array whose shape or dtype differs from the entry's."""


class ProvidedTensorTable(TensorTable):
    """``TensorTable`` with entries read from ``source`` on every access (see the module
    docstring). ``provided`` maps each such name to its type; ``tensors`` are held."""

    def __init__(self, tensors: Mapping[str, np.ndarray] | None, provided: Mapping[str, TensorType],
                 source: TensorSource) -> None:
        super().__init__(tensors)
        overlap = sorted(set(provided) & set(self._data))
        if overlap:
            raise ValueError(f"tensor {overlap[0]!r} is both held and provided")
        self._provided = dict(provided)
        self._source = source
        self._hashes: dict[str, str] = {}   # shared with derived tables: one hash per entry

    @classmethod
    def _derived(cls, parent: "ProvidedTensorTable", data: dict[str, np.ndarray], infos: dict[str, TensorInfo],
                 provided: dict[str, TensorType]) -> "ProvidedTensorTable":
        table = cls.__new__(cls)
        table._data, table._info = data, infos
        table._provided, table._source, table._hashes = provided, parent._source, parent._hashes
        return table

    # ---------------------------------------------------------------- reading

    def __getitem__(self, name: str) -> np.ndarray:
        want = self._provided.get(name)
        if want is None:
            return super().__getitem__(name)
        array = np.require(self._source(name), requirements="C")
        got = TensorType(tuple(array.shape), dtype_of_numpy(array.dtype))
        if got != want:
            raise ProvidedTensorMismatchError(f"the source gave {got} for tensor {name!r}, declared {want}")
        array.setflags(write=False)
        return array

    def __contains__(self, name: object) -> bool:
        return name in self._provided or name in self._data

    def __iter__(self) -> Iterator[str]:
        yield from self._data
        yield from self._provided

    def __len__(self) -> int:
        return len(self._data) + len(self._provided)

    def is_provided(self, name: str) -> bool:
        """True when ``name`` is read from the source on each access (not held)."""
        return name in self._provided

    def tensor_type(self, name: str) -> TensorType:
        want = self._provided.get(name)
        return want if want is not None else super().tensor_type(name)

    def info(self, name: str) -> TensorInfo:
        want = self._provided.get(name)
        if want is None:
            return super().info(name)
        digest = self._hashes.get(name)
        if digest is None:
            digest = self._hashes[name] = sha256_of(self[name])
        return TensorInfo(name, tuple(want.shape), want.dtype, digest)

    def infos(self) -> tuple[TensorInfo, ...]:
        return tuple(self.info(n) for n in sorted(self))

    def nbytes(self) -> int:
        from .types import numpy_dtype
        provided = sum(int(np.prod(t.shape, dtype=np.int64)) * numpy_dtype(t.dtype).itemsize
                       for t in self._provided.values())
        return super().nbytes() + provided

    # ---------------------------------------------------------------- deriving

    def with_tensors(self, extra: Mapping[str, np.ndarray]) -> "ProvidedTensorTable":
        """Adds held tensors (hashing only those); an added name replaces a provided one."""
        added = TensorTable(extra)
        data = {**self._data, **{n: added[n] for n in added}}
        infos = {**self._info, **{n: added.info(n) for n in added}}
        provided = {n: t for n, t in self._provided.items() if n not in extra}
        return self._derived(self, data, infos, provided)

    def subset(self, names: Iterable[str]) -> "ProvidedTensorTable":
        keep = set(names)
        return self._derived(self, {n: a for n, a in self._data.items() if n in keep},
                             {n: i for n, i in self._info.items() if n in keep},
                             {n: t for n, t in self._provided.items() if n in keep})

    def held_nbytes(self) -> int:
        """Bytes of the tensors this table holds (the provided ones cost nothing until read)."""
        return super().nbytes()

    def __repr__(self) -> str:
        return f"ProvidedTensorTable({len(self._data)} held, {len(self._provided)} provided)"
