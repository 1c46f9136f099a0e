"""Writing ``weights.safetensors`` one tensor at a time.

``safetensors.numpy.save_file`` serializes every tensor into one bytes object before writing,
so saving costs the tensors twice over, and a table whose weights are read on demand
(``ir.provided_tensors``) would have them all in memory at once. This writer takes the header
from the tensors' types alone, then reads, writes and forgets one tensor at a time.

The bytes are those ``safetensors.numpy.save_file`` writes for the same tensors (a test
compares them): tensors ordered by dtype, widest first in safetensors' own dtype order, then
by name; a compact JSON header padded with spaces to a multiple of 8 bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..ir import TensorTable

# safetensors' Dtype enum order (its files sort by it, descending); the IR's dtypes only
_ORDER = ("bool", "uint8", "int8", "int16", "uint16", "float16", "int32", "uint32", "float32", "float64",
          "int64", "uint64")
_CODES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
          "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}


def layout(tensors: TensorTable) -> tuple[bytes, list[tuple[str, int]]]:
    """(header bytes with their 8-byte length prefix, [(name, nbytes)] in file order)."""
    types = {n: tensors.tensor_type(n) for n in tensors}
    for name, t in types.items():
        if t.dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
    order = sorted(types, key=lambda n: (-_ORDER.index(types[n].dtype), n))
    header: dict[str, Any] = {}
    sizes, at = [], 0
    for name in order:
        t = types[name]
        n = math.prod(t.shape) * np.dtype(t.dtype).itemsize
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        sizes.append((name, n))
        at += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, sizes


def digest_cache_dir() -> Path:
    """``$BITSMITH_CACHE_DIR/weights-digests`` (else under ``~/.cache/bitsmith``): file digests
    of weights written before, by content key (``write_weights``)."""
    root = os.environ.get("BITSMITH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "bitsmith") / "weights-digests"


def write_weights(path: Path, tensors: TensorTable, digest_cache: Path | None = None) -> dict[str, Any]:
    """Writes ``tensors`` to ``path`` holding one tensor at a time; returns {sha256, size} of the file.

    With ``digest_cache`` (a folder) and a plain in-memory ``TensorTable`` on a little-endian
    host, the file's sha256 is looked up there (and recorded on a miss) under a key made of the
    header and every tensor's own sha256 (``TensorTable.info``, computed from its bytes when the
    table was made): the file is exactly the header followed by those tensors' bytes, so equal
    keys mean equal files, and a recompile of the same weights skips hashing them again."""
    head, sizes = layout(tensors)
    key = _content_key(head, sizes, tensors) if digest_cache is not None else None
    known = _read_known_digest(digest_cache, key) if key is not None else None
    digest, size = (None if known else hashlib.sha256(head)), len(head)
    with open(path, "wb") as f:
        f.write(head)
        for name, nbytes in sizes:
            array = np.ascontiguousarray(tensors[name])
            data = memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
            if data.nbytes != nbytes:
                raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, its type says {nbytes}")
            f.write(data)
            if digest is not None:
                digest.update(data)
            size += nbytes
            del array, data
    if known:
        return {"sha256": known, "size": size}
    entry = {"sha256": digest.hexdigest(), "size": size}
    if key is not None:
        _record_digest(digest_cache, key, entry["sha256"])
    return entry


def _content_key(head: bytes, sizes: list[tuple[str, int]], tensors: TensorTable) -> str | None:
    """sha256 of the header and each tensor's sha256 in file order; None where a tensor's recorded
    digest might not be of the bytes written (a table that reads tensors on demand, a big-endian
    host or array)."""
    if type(tensors) is not TensorTable or sys.byteorder != "little":
        return None
    h = hashlib.sha256(b"bitsmith-weights-file-1\0" + head)
    for name, _ in sizes:
        if tensors[name].dtype.byteorder == ">":
            return None
        h.update(bytes.fromhex(tensors.info(name).sha256))
    return h.hexdigest()


def _read_known_digest(folder: Path, key: str) -> str | None:
    try:
        text = (folder / key).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _record_digest(folder: Path, key: str, sha256: str) -> None:
    """Written to a temp name and renamed; a failed write costs only the next save's hashing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(sha256 + "\n")
        os.replace(tmp, folder / key)
    except OSError:
        pass
