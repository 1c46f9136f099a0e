"""Reading an artifact's files safely: inside the directory, of the recorded size, hash-checked.

Every file of an artifact is opened through ``open_file``: the name is a checked relative name
(no ``..``, no absolute path), each directory on the way is opened relative to the previous one
with ``O_NOFOLLOW | O_DIRECTORY`` and the file itself with ``O_NOFOLLOW | O_NONBLOCK``, so a
symbolic link anywhere below the artifact root, a FIFO or a device is refused and nothing outside
the directory is ever read. The size is checked with ``fstat`` on the opened descriptor before
any byte is read; bytes are hashed as they stream in, and when they are kept, the hash is taken
over exactly the bytes the caller gets. Errors never describe a file's content (no hash of it).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..backends.files import TargetFiles, aligned_bytes, as_array
from ..errors import ArtifactError
from .manifest import check_relative_name

CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """What the manifest records of one listed file."""

    sha256: str
    size: int


def open_file(root: Path, name: str) -> int:
    """A read-only descriptor of the regular file ``root/name``, with no symlink on the way.

    Raises ArtifactError naming ``root/name`` if it is missing, is a symbolic link (or lies
    under one), or is not a regular file. The root itself may be a link (the caller chose it).
    """
    where = str(root / name)
    try:
        check_relative_name(name)
    except ValueError as e:
        raise ArtifactError(where, str(e)) from None
    *dirs, leaf = name.split("/")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(str(root), f"cannot open the artifact directory: {e.strerror}") from None
    try:
        for i, part in enumerate(dirs):
            here = str(root.joinpath(*dirs[:i + 1]))
            _refuse_link(fd, part, here, "directory")
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise _open_error(e, where, here) from None
            os.close(fd)
            fd = nxt
        _refuse_link(fd, leaf, where, "file")
        try:
            out = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:
            raise _open_error(e, where, where) from None
    finally:
        os.close(fd)
    mode = os.fstat(out).st_mode
    if not stat.S_ISREG(mode):
        os.close(out)
        raise ArtifactError(where, "not a regular file (an artifact holds only regular files)")
    return out


def _refuse_link(dir_fd: int, part: str, where: str, what: str) -> None:
    try:
        st = os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return  # reported by the open, with the file's name
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(where, f"is a symbolic link; an artifact's {what}s must be real {what}s "
                                   "inside its directory (links are never followed)")


def _open_error(e: OSError, where: str, part: str) -> ArtifactError:
    if e.errno == errno.ENOENT:
        return ArtifactError(where, "missing (manifest.json lists it)")
    if e.errno in (errno.ELOOP, errno.EMLINK):
        return ArtifactError(part, "is a symbolic link; links are never followed")
    if e.errno == errno.ENOTDIR:
        return ArtifactError(part, "a part of the path is not a directory")
    return ArtifactError(where, f"cannot be opened: {e.strerror}")


def check_size(fd: int, where: str, size: int) -> None:
    actual = os.fstat(fd).st_size
    if actual != size:
        raise ArtifactError(where, f"is {actual} bytes, but the manifest says {size} "
                                   "(the file is truncated, extended or replaced)")


def read_exact(fd: int, into: memoryview, where: str) -> None:
    got = 0
    while got < len(into):
        n = os.readv(fd, [into[got:got + CHUNK]])
        if n == 0:
            raise ArtifactError(where, "shorter than its size while being read (changed during the load)")
        got += n


def check_eof(fd: int, where: str) -> None:
    if os.read(fd, 1):
        raise ArtifactError(where, "longer than its size while being read (changed during the load)")


def hash_mismatch(where: str) -> ArtifactError:
    return ArtifactError(where, "sha256 does not match the manifest (the file is corrupted or replaced)")


def allocate(size: int, where: str, make: Callable[[int], Any]) -> Any:
    """``make(size)``, or ArtifactError when a file (of a size the manifest and fstat agree on)
    is too large for this machine's memory."""
    try:
        return make(size)
    except MemoryError:
        raise ArtifactError(where, f"{size} bytes do not fit in this process's memory") from None


def read_checked(root: Path, name: str, entry: FileEntry, into: Callable[[int], np.ndarray] | None = None,
                 ) -> np.ndarray | None:
    """Streams ``root/name`` through sha256, checking size first and the hash at the end.

    With ``into``, the bytes land in ``into(size)`` (a uint8 array, returned after the hash
    matched); without, they are hashed and dropped (returns None).
    """
    where = str(root / name)
    fd = open_file(root, name)
    try:
        check_size(fd, where, entry.size)
        digest = hashlib.sha256()
        if into is not None:
            buf = allocate(entry.size, where, into)
            view = memoryview(buf)
            read_exact(fd, view, where)
            digest.update(view)
        else:
            buf, left = None, entry.size
            while left:
                chunk = os.read(fd, min(CHUNK, left))
                if not chunk:
                    raise ArtifactError(where, "shorter than its size while being read (changed during the load)")
                digest.update(chunk)
                left -= len(chunk)
        check_eof(fd, where)
    finally:
        os.close(fd)
    if digest.hexdigest() != entry.sha256:
        raise hash_mismatch(where)
    return buf


def read_bytes(root: Path, name: str, entry: FileEntry) -> bytes:
    """The file's bytes, checked (one copy: read into a bytearray, hashed, returned as bytes)."""
    where = str(root / name)
    fd = open_file(root, name)
    try:
        check_size(fd, where, entry.size)
        buf = allocate(entry.size, where, bytearray)
        read_exact(fd, memoryview(buf), where)
        check_eof(fd, where)
    finally:
        os.close(fd)
    if hashlib.sha256(buf).hexdigest() != entry.sha256:
        raise hash_mismatch(where)
    return bytes(buf)


class ArtifactFiles(TargetFiles):
    """The lazy, verified target files of an artifact (see ``bitsmith.backends.files``).

    ``read`` records which files were read, so the loader can hash-check the rest afterwards.
    """

    def __init__(self, root: Path, entries: Mapping[str, FileEntry], prefix: str,
                 read: set[str] | None = None) -> None:
        self._root, self._prefix = root, prefix
        self._entries = {n[len(prefix):]: e for n, e in entries.items() if n.startswith(prefix)}
        self._full = {n: e for n, e in entries.items()}
        self.read = read if read is not None else set()

    def _entry(self, name: str) -> FileEntry:
        if name not in self._entries:
            raise KeyError(name)
        return self._entries[name]

    def __getitem__(self, name: str) -> bytes:
        entry = self._entry(name)
        full = self._prefix + name
        data = read_bytes(self._root, full, entry)
        self.read.add(full)
        return data

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def size(self, name: str) -> int:
        return self._entry(name).size

    def path(self, name: str) -> str:
        return str(self._root / (self._prefix + name))

    def read_array(self, name: str, dtype: np.dtype | str, shape: Sequence[int] | None = None) -> np.ndarray:
        entry = self._entry(name)
        full = self._prefix + name
        raw = read_checked(self._root, full, entry, aligned_bytes)
        self.read.add(full)
        return as_array(raw, dtype, shape, self.path(name))

    def under(self, prefix: str) -> "ArtifactFiles":
        return ArtifactFiles(self._root, self._full, self._prefix + prefix, self.read)
