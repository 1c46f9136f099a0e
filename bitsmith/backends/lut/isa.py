"""The LUT engine's binary instruction set: formats, encoder, decoder (spec: docs/lut-isa.md).

An instruction is one little-endian 64-bit word; bits 0-7 hold the opcode, the rest the
fields listed in ``FORMATS`` (lowest bit first). A stream starts with a 4-word header. The
tables here are the single source of truth: the encoder, the decoder, the C executor's
constants (checked by a test) and the field tables in the spec all follow them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ...errors import BitsmithError

MAGIC = int.from_bytes(b"LUTISA01", "little")
VERSION = 1
HEADER_WORDS = 4
ROWS_PER_TILE = 16
WORD_BYTES = 32          # one weight word: 16 rows x 2 bytes
PARAM_FLOATS = 32        # one SCALE parameter block: 16 scales, 16 scale*offset
MAX_WORDS = {0: 64, 1: 32}  # per LUTACC by mode: keeps the int16 partial sums below 2**15


class ISAError(BitsmithError, ValueError):
    """An instruction or stream that does not follow docs/lut-isa.md."""


@dataclass(frozen=True)
class Field:
    name: str
    lo: int
    width: int
    minimum: int = 0
    cap: int | None = None   # a tighter maximum than the width allows

    @property
    def maximum(self) -> int:
        top = (1 << self.width) - 1 + self.minimum
        return top if self.cap is None else min(top, self.cap)


@dataclass(frozen=True)
class Format:
    opcode: int
    name: str
    fields: tuple[Field, ...]
    meaning: str


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format(0x00, "END", (), "end of stream"),
    Format(0x01, "TABLE", (Field("block", 8, 20), Field("kg0", 28, 20), Field("nkg", 48, 16, 1)),
           "build the 16-entry tables of activation quads kg0..kg0+nkg-1 for every row m, "
           "their scale TS[m][block] and the activation sum XS[m][block]"),
    Format(0x02, "SYNC", (), "barrier: every TABLE before it is complete"),
    Format(0x03, "TILE", (Field("wptr", 8, 56),),
           "start an output tile: ACC = 0, YT = 0, WPTR = wptr (in 32-byte weight words)"),
    Format(0x04, "LUTACC", (Field("mode", 8, 1), Field("plane", 9, 4), Field("kg0", 13, 20),
                            Field("nwords", 33, 7, 1, 64), Field("block", 40, 20)),
           "ACC += TS[block] * (lookups of nwords weight words from WPTR, planes weighted by 2^plane); "
           "WPTR += nwords"),
    Format(0x05, "SCALE", (Field("block0", 8, 20), Field("nblocks", 28, 8, 1), Field("pidx", 36, 28)),
           "YT += s * ACC - (s*offset) * (XS[block0] + ... + XS[block0+nblocks-1]) with parameter "
           "block pidx; ACC = 0"),
    Format(0x06, "OUTLIER", (Field("start", 8, 36), Field("count", 44, 20, 1)),
           "YT[row] += val * X[col] for outlier records start..start+count-1"),
    Format(0x07, "STORE", (Field("row0", 8, 32), Field("nrows", 40, 5, 1, 16)),
           "Y[:, row0 + r] = YT[:, r] for r < nrows; ends the tile"),
    Format(0x08, "BCQMUL", (Field("slot", 8, 2), Field("kind", 10, 1)),
           "binary-coded planes: MUL[slot] = the plane-pair weights at WPTR (kind 0: int16 powers of "
           "two, 2 words; kind 1: float32, 4 words); WPTR += 2 or 4"),
    Format(0x09, "BCQACC", (Field("npairs", 8, 2, 1), Field("kg0", 10, 20), Field("nwords", 30, 6, 1),
                            Field("block", 36, 20)),
           "for plane pairs q < npairs: per-row, per-plane sums of pair-mode lookups of nwords weight words "
           "(pair q's words follow pair q-1's), weighted by MUL[q]; ACC += their total times TS[block]; "
           "WPTR += npairs * nwords"),
)}
BY_OPCODE: dict[int, Format] = {f.opcode: f for f in FORMATS.values()}
MODE_QUAD, MODE_PAIR = 0, 1
BCQ_SLOTS = 4                      # plane pairs of one binary-coded layer: at most 8 planes
BCQ_MUL_INT, BCQ_MUL_FLOAT = 0, 1  # BCQMUL kinds
BCQ_MUL_WORDS = {BCQ_MUL_INT: 2, BCQ_MUL_FLOAT: 4}


@dataclass(frozen=True)
class Instruction:
    op: str
    args: tuple[tuple[str, int], ...] = ()

    @classmethod
    def make(cls, op: str, **fields: int) -> "Instruction":
        fmt = _format(op)
        names = [f.name for f in fmt.fields]
        if sorted(fields) != sorted(names):
            raise ISAError(f"{op} takes fields {names}, got {sorted(fields)}")
        for f in fmt.fields:
            if not f.minimum <= int(fields[f.name]) <= f.maximum:
                raise ISAError(f"{op}.{f.name} = {fields[f.name]} out of range [{f.minimum}, {f.maximum}]")
        return cls(op, tuple((n, int(fields[n])) for n in names))

    def __getitem__(self, name: str) -> int:
        return dict(self.args)[name]

    def __str__(self) -> str:
        return self.op + "".join(f" {k}={v}" for k, v in self.args)


def _format(op: str) -> Format:
    try:
        return FORMATS[op]
    except KeyError:
        raise ISAError(f"unknown LUT instruction {op!r}; valid: {', '.join(FORMATS)}") from None


def encode_columns(op: str, count: int | None = None, /, **columns: np.ndarray | int) -> np.ndarray:
    """Encodes many instructions of one kind at once: each field is an int or an int array."""
    fmt = _format(op)
    if sorted(columns) != sorted(f.name for f in fmt.fields):
        raise ISAError(f"{op} takes fields {[f.name for f in fmt.fields]}, got {sorted(columns)}")
    n = count if count is not None else max((np.size(v) for v in columns.values()), default=1)
    words = np.full(n, fmt.opcode, dtype=np.uint64)
    for f in fmt.fields:
        v = np.broadcast_to(np.asarray(columns[f.name], dtype=np.int64), (n,))
        if v.size and (v.min() < f.minimum or v.max() > f.maximum):
            raise ISAError(f"{op}.{f.name} out of range [{f.minimum}, {f.maximum}]: "
                           f"{int(v.min())}..{int(v.max())}")
        words |= (v - f.minimum).astype(np.uint64) << np.uint64(f.lo)
    return words


def encode(instructions: Sequence[Instruction]) -> np.ndarray:
    """Instructions -> uint64 words (no header)."""
    return np.concatenate([encode_columns(i.op, 1, **dict(i.args)) for i in instructions]) \
        if instructions else np.zeros(0, np.uint64)


def decode(words: np.ndarray) -> list[Instruction]:
    """uint64 words (no header) -> instructions; unknown opcodes, stray bits or fields above their
    caps raise ISAError (so every decoded instruction encodes back to the same word)."""
    out = []
    for pos, w in enumerate(np.asarray(words, dtype=np.uint64).tolist()):
        fmt = BY_OPCODE.get(w & 0xFF)
        if fmt is None:
            raise ISAError(f"word {pos}: unknown opcode {w & 0xFF:#04x}")
        used = 0xFF
        args = []
        for f in fmt.fields:
            mask = (1 << f.width) - 1
            value = ((w >> f.lo) & mask) + f.minimum
            if value > f.maximum:  # a cap tighter than the field's width (LUTACC.nwords, STORE.nrows)
                raise ISAError(f"word {pos}: {fmt.name}.{f.name} = {value} above its maximum {f.maximum}")
            args.append((f.name, value))
            used |= mask << f.lo
        if w & ~used:
            raise ISAError(f"word {pos}: {fmt.name} has bits set outside its fields ({w:#018x})")
        out.append(Instruction(fmt.name, tuple(args)))
    return out


@dataclass(frozen=True)
class StreamHeader:
    out_features: int     # N: rows of the output
    padded_in: int        # Kpad: activation length, a multiple of 4 (quads)
    blocks: int           # table blocks (one table scale TS and sum XS per block and activation row)
    planes: int           # bit planes of the unsigned weight integers

    def words(self) -> np.ndarray:
        for name, value, bits in (("out_features", self.out_features, 32), ("padded_in", self.padded_in, 32),
                                  ("blocks", self.blocks, 64), ("planes", self.planes, 8)):
            if not 0 <= value < (1 << bits):
                raise ISAError(f"stream header {name}={value} does not fit its {bits}-bit field")
        return np.array([MAGIC, VERSION | (self.planes << 8),
                         self.out_features | (self.padded_in << 32), self.blocks], dtype=np.uint64)

    @classmethod
    def parse(cls, words: np.ndarray) -> "StreamHeader":
        w = np.asarray(words[:HEADER_WORDS], dtype=np.uint64).tolist()
        if len(w) < HEADER_WORDS or w[0] != MAGIC:
            raise ISAError("not a LUT instruction stream (bad magic)")
        if w[1] & 0xFF != VERSION:
            raise ISAError(f"LUT stream version {w[1] & 0xFF}, this runtime reads {VERSION}")
        if w[1] >> 16:
            raise ISAError(f"LUT stream header word 1 has bits set above its version and planes bytes ({w[1]:#018x})")
        return cls(w[2] & 0xFFFFFFFF, w[2] >> 32, w[3], (w[1] >> 8) & 0xFF)


def opcode_counts(stream: np.ndarray) -> dict[str, int]:
    """Instruction counts by opcode name of a stream with its header."""
    ops = np.asarray(stream[HEADER_WORDS:], dtype=np.uint64) & np.uint64(0xFF)
    values, counts = np.unique(ops, return_counts=True)
    return {BY_OPCODE[int(v)].name if int(v) in BY_OPCODE else f"0x{int(v):02x}": int(c)
            for v, c in zip(values, counts)}


def field_columns(stream: np.ndarray, op: str) -> Mapping[str, np.ndarray]:
    """The field values of every ``op`` instruction in a stream (with header), vectorized."""
    fmt = _format(op)
    w = np.asarray(stream[HEADER_WORDS:], dtype=np.uint64)
    w = w[(w & np.uint64(0xFF)) == fmt.opcode]
    return {f.name: ((w >> np.uint64(f.lo)) & np.uint64((1 << f.width) - 1)).astype(np.int64) + f.minimum
            for f in fmt.fields}
