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


def write_weights(path: Path, tensors: TensorTable) -> dict[str, Any]:
    """Writes ``tensors`` to ``path`` holding one tensor at a time; returns {sha256, size} of the file."""
    head, sizes = layout(tensors)
    digest, size = hashlib.sha256(head), len(head)
    with open(path, "wb") as f:
        f.write(head)
        for name, nbytes in sizes:
            array = np.ascontiguousarray(tensors[name])
            data = memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8))
            if data.nbytes != nbytes:
                raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, its type says {nbytes}")
            f.write(data)
            digest.update(data)
            size += nbytes
            del array, data
    return {"sha256": digest.hexdigest(), "size": size}
