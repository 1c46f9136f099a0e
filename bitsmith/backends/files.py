"""What ``Backend.load`` receives as ``files``: a lazy, verified view of an artifact's target files.

``TargetFiles`` is a ``Mapping[str, bytes]`` (so a backend or plugin written for a plain dict
keeps working: ``files[name]`` returns the file's bytes), but nothing is read until asked, and
every read checks the file's size and sha256 against the manifest over the very bytes it
returns. Backends that hold large files (kernel operands, LUT weights) call ``read_array``,
which reads the file once straight into an aligned numpy array. The helpers below accept any
Mapping, so code and tests can still pass a plain ``dict``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError

ALIGN = 64   # what compiled CPU kernels assume of their operands (tvm executor.ALIGN)


class TargetFiles(Mapping[str, bytes]):
    """Target files by name (``target/`` prefix removed); see the module docstring."""

    @abstractmethod
    def size(self, name: str) -> int:
        """The file's size in bytes as the manifest records it (reads nothing)."""

    @abstractmethod
    def path(self, name: str) -> str:
        """Where the file is, for error messages (a path under the artifact directory)."""

    @abstractmethod
    def read_array(self, name: str, dtype: np.dtype | str, shape: Sequence[int] | None = None) -> np.ndarray:
        """The whole file as a read-only, ``ALIGN``-aligned array of ``dtype`` (little-endian),
        read once and hash-checked; ``shape`` must multiply out to the file's size (ArtifactError)."""

    @abstractmethod
    def under(self, prefix: str) -> "TargetFiles":
        """The files whose name starts with ``prefix``, with the prefix removed (reads nothing)."""


class BytesFiles(TargetFiles):
    """TargetFiles over bytes already in memory (a plain dict): for tests and in-process use."""

    def __init__(self, data: Mapping[str, bytes], where: str = "target/") -> None:
        self._data, self._where = dict(data), where

    def __getitem__(self, name: str) -> bytes:
        return bytes(self._data[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def size(self, name: str) -> int:
        return len(self._data[name])

    def path(self, name: str) -> str:
        return self._where + name

    def read_array(self, name: str, dtype: np.dtype | str, shape: Sequence[int] | None = None) -> np.ndarray:
        data = self[name]
        out = aligned_bytes(len(data))
        out[:] = np.frombuffer(data, np.uint8)
        return as_array(out, dtype, shape, self.path(name))

    def under(self, prefix: str) -> "BytesFiles":
        return BytesFiles({k[len(prefix):]: v for k, v in self._data.items() if k.startswith(prefix)},
                          self._where + prefix)


def target_files(files: Mapping[str, bytes]) -> TargetFiles:
    """``files`` as TargetFiles (a plain mapping is wrapped)."""
    return files if isinstance(files, TargetFiles) else BytesFiles(files)


def aligned_bytes(n: int) -> np.ndarray:
    """A writable uint8 array of ``n`` bytes whose data starts at an ``ALIGN``-byte boundary."""
    buf = np.empty(n + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off:off + n]


def as_array(raw: np.ndarray, dtype: np.dtype | str, shape: Sequence[int] | None, where: str) -> np.ndarray:
    """``raw`` (uint8) viewed as ``dtype`` little-endian with ``shape``; ArtifactError when the
    byte count does not multiply out."""
    dt = np.dtype(dtype).newbyteorder("<")
    if dt.itemsize == 0 or raw.size % dt.itemsize:
        raise ArtifactError(where, f"{raw.size} bytes is not a whole number of {dt.name} items")
    count = raw.size // dt.itemsize
    if shape is not None:
        shape = tuple(int(d) for d in shape)
        want = 1
        for d in shape:
            want *= d
        if any(d < 0 for d in shape) or want != count:
            raise ArtifactError(where, f"{raw.size} bytes, but {dt.name}{list(shape)} needs {want * dt.itemsize}")
    out = raw.view(dt) if count else np.empty(0, dt)
    out = out.reshape(shape if shape is not None else (count,))
    out.setflags(write=False)
    return out
