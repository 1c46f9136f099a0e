"""Reading ``weights.safetensors`` once, strictly, into aligned tensors.

The safetensors layout is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{dtype, shape, data_offsets}``, then the data. This reader parses the header
itself (size-capped, strict JSON), requires the tensors' byte ranges to tile the data exactly
(in range, no overlap, no hole, each as long as its dtype and shape say) and to match the
manifest's table, then reads the data once, tensor by tensor, into one buffer where every
tensor starts on a 64-byte boundary (what compiled kernels need, so nothing is copied again),
hashing the bytes as they arrive. Peak memory is the tensors plus the header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.files import ALIGN, aligned_bytes
from ..errors import ArtifactError
from ..ir import TensorTable
from ..ir.types import IRTypeError
from .artifact_files import FileEntry, allocate, check_eof, check_size, hash_mismatch, open_file, read_exact
from .manifest import WEIGHTS, strict_json

MAX_HEADER = 16 << 20   # bytes of JSON header; SmolLM2's is ~30 KB
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
          "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entries(header: Any, where: str, data_len: int) -> list[tuple[int, int, str, str, tuple[int, ...]]]:
    """[(begin, end, name, IR dtype, shape)] in file order, checked to tile [0, data_len)."""
    if not isinstance(header, dict):
        raise ArtifactError(where, "header: not a JSON object")
    out = []
    for name, t in header.items():
        if name == "__metadata__":
            if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
                raise ArtifactError(where, "header.__metadata__: must map strings to strings")
            continue
        field = f"header[{json.dumps(name)[:80]}]"
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise ArtifactError(where, f"{field}: must be an object with exactly dtype, shape, data_offsets")
        if not isinstance(t["dtype"], str) or t["dtype"] not in DTYPES:
            raise ArtifactError(where, f"{field}.dtype: {str(t['dtype'])[:40]!r} is not one of {sorted(DTYPES)}")
        shape, offsets = t["shape"], t["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise ArtifactError(where, f"{field}.shape: expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ArtifactError(where, f"{field}.data_offsets: expected [begin, end] with "
                                       f"0 <= begin <= end <= {data_len}")
        dtype = DTYPES[t["dtype"]]
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ArtifactError(where, f"{field}: {dtype}{shape} needs {nbytes} bytes, its data_offsets "
                                       f"span {offsets[1] - offsets[0]}")
        out.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    out.sort()
    at = 0
    for begin, end, name, _, _ in out:
        if begin != at:
            problem = "overlaps the tensor before it" if begin < at else f"leaves a hole at byte {at}"
            raise ArtifactError(where, f"header[{json.dumps(name)[:80]}].data_offsets: {problem}")
        at = end
    if at != data_len:
        raise ArtifactError(where, f"the tensors cover {at} of the {data_len} data bytes")
    return out


def read_weights(root: Path, entry: FileEntry, listed: list[dict[str, Any]]) -> TensorTable:
    """The tensor table of ``root/weights.safetensors``, checked against the file entry (size,
    sha256 over every byte) and the manifest's ``tensors`` (names, dtypes, shapes, data sha256)."""
    where = str(root / WEIGHTS)
    fd = open_file(root, WEIGHTS)
    try:
        check_size(fd, where, entry.size)
        digest = hashlib.sha256()
        if entry.size < 8:
            raise ArtifactError(where, f"{entry.size} bytes is too short for a safetensors file")
        head = bytearray(8)
        read_exact(fd, memoryview(head), where)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > entry.size:
            raise ArtifactError(where, f"header length {n} is beyond the file's {entry.size} bytes or "
                                       f"the {MAX_HEADER}-byte cap")
        text = bytearray(n)
        read_exact(fd, memoryview(text), where)
        digest.update(head)
        digest.update(text)
        try:
            header = strict_json(bytes(text))
        except ValueError as e:
            raise ArtifactError(where, f"header: not valid JSON: {e}") from None
        entries = _entries(header, where, entry.size - 8 - n)
        expected = {t["name"]: t for t in listed}
        names = {e[2] for e in entries}
        if names != set(expected):
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            raise ArtifactError(where, f"tensors differ from the manifest's table: missing {missing[:5]}, "
                                       f"unlisted {[x[:80] for x in extra[:5]]}")
        for _, _, name, dtype, shape in entries:
            t = expected[name]
            if list(shape) != t["shape"] or dtype != t["dtype"]:
                raise ArtifactError(where, f"tensor {name!r} is {dtype}{list(shape)} but the manifest "
                                           f"says {t['dtype']}{t['shape']}")
        slots, total = [], 0
        for begin, end, name, dtype, shape in entries:
            slots.append((total, end - begin, name, dtype, shape))
            total += -(-(end - begin) // ALIGN) * ALIGN
        arena = allocate(total, where, aligned_bytes)
        view = memoryview(arena)
        for start, size, *_ in slots:
            part = view[start:start + size]
            read_exact(fd, part, where)
            digest.update(part)
        check_eof(fd, where)
    finally:
        os.close(fd)
    if digest.hexdigest() != entry.sha256:
        raise hash_mismatch(where)
    arrays = {}
    for start, size, name, dtype, shape in slots:
        raw = arena[start:start + size]
        arrays[name] = raw.view(np.dtype(dtype)).reshape(shape) if size else np.zeros(shape, dtype)
    try:
        table = TensorTable(arrays)
    except IRTypeError as e:
        raise ArtifactError(where, f"holds a tensor of a dtype the IR does not know: {e}") from None
    for name, t in expected.items():
        if table.info(name).sha256 != t["sha256"]:
            raise ArtifactError(where, f"tensor {name!r}: its data's sha256 differs from the manifest's")
    return table
