"""A GGUF file's header (metadata and tensor table) and its tensors' bytes, memory-mapped.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value: for SmolLM2's
49,152 tokens and 48,900 merges that is 3-15 s (measured here under load), far more than the
weights take to decode. This reader walks the same layout (GGUF v2/v3, little-endian: magic,
version, tensor count, kv count, key/values, tensor infos, aligned data; the spec in
ggml/docs/gguf.md) with ``struct``, keeps scalar and string values, skips arrays (noting where each lies, so
``GGUFFile.array`` reads one when asked: the tokenizer's lists) and hands tensors out as memmap slices. Type
codes and block sizes come from the ``gguf`` package (``GGUFValueType``, ``GGML_QUANT_SIZES``);
tests check the result against ``GGUFReader``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands (says where it stopped)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: slowest dim first ([out, in] for a matrix)
    type_id: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    fields: dict[str, Any]  # scalars and strings; arrays map to None
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    data: np.ndarray  # uint8 memmap of the whole file
    array_at: dict[str, int] = field(default_factory=dict)  # array key -> byte offset of its value

    def array(self, key: str) -> list[Any] | None:
        """The metadata array ``key`` read in full (None: no such array), e.g. the tokenizer's
        ``tokenizer.ggml.tokens``; the header walk skips arrays, this reads one when asked."""
        at = self.array_at.get(key)
        if at is None:
            return None
        cur = _Cursor(memoryview(self.data))
        cur.pos = at
        item, count = cur.take("<I"), cur.take("<Q")
        if item == STRING:
            return [cur.string() for _ in range(count)]
        if item in _SCALARS:
            fmt = _SCALARS[item]
            end = cur.pos + struct.calcsize(fmt) * count
            if end > len(self.data):
                raise GGUFFormatError(f"array {key} runs past the end of the file")
            return np.frombuffer(self.data, dtype=fmt, count=count, offset=cur.pos).tolist()
        return [cur.value(item) for _ in range(count)]

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        return self.data[info.offset:info.offset + info.nbytes]

    def header_bytes(self) -> bytes:
        """Everything before the tensor data: the metadata (tokenizer included) and tensor table."""
        return bytes(self.data[:self.data_offset])


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise GGUFFormatError(f"truncated at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"string of {n} bytes at byte {self.pos} runs past the end")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item == STRING:
                for _ in range(count):  # only the lengths are read
                    length = self.take("<Q")
                    self.pos += length
            elif item in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[item]) * count
            elif item == ARRAY:  # llama.cpp writes no nested arrays; a file that does is not ours to read
                raise GGUFFormatError(f"nested array at byte {self.pos}")
            else:
                for _ in range(count):
                    self.value(item)
            return None
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"unknown value type {vtype} at byte {self.pos}")
        return self.take(_SCALARS[vtype])


def open_gguf(path: str | Path) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data))
    if bytes(data[:4]) != MAGIC:
        raise GGUFFormatError("no GGUF magic")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} (supported: 2, 3)")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    fields: dict[str, Any] = {}
    array_at: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.take("<I")
        if vtype == ARRAY:
            array_at[key] = cur.pos
        fields[key] = cur.value(vtype)
    raw = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
        raw.append((name, dims, cur.take("<I"), cur.take("<Q")))
    align = fields.get("general.alignment") or 32
    if not isinstance(align, int) or not 0 < align <= 1 << 20:
        raise GGUFFormatError(f"general.alignment {align!r} is not a positive integer")
    data_offset = -(-cur.pos // align) * align
    tensors = []
    for name, dims, type_id, rel in raw:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFFormatError(f"tensor {name}: unknown ggml type {type_id}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        count = math.prod(dims)  # Python ints: no silent wrap-around
        if count == 0 or count % block:
            raise GGUFFormatError(f"tensor {name}: dims {dims} are empty or not whole {qtype.name} blocks of {block}")
        nbytes = count // block * size
        offset = data_offset + rel
        if offset + nbytes > len(data):
            raise GGUFFormatError(f"tensor {name} runs past the end of the file")
        tensors.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), type_id, qtype.name, offset, nbytes))
    return GGUFFile(path, fields, tuple(tensors), data_offset, data, array_at)
