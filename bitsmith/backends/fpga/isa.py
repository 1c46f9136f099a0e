"""The FPGA accelerator's instruction set: queues, formats, encoder, decoder, validator
(spec: docs/fpga-isa.md).

The machine follows FlightLLM (Zeng et al., FPGA 2024) and its public demo
(FlightLLM/flightllm_test_demo, ``profile/inst_gen/isa.py``): one stream of 32-bit words is
dispatched into six in-order queues, LD (HBM -> on-chip), ST (on-chip -> HBM), MM
(matrix-matrix), MV (matrix-vector), MISC (vector work) and SYS; every instruction's first
word carries the queue's opcode in bits 31:28, a 5-bit *wait* mask and a 5-bit *release* mask
over the other five queues. The field layouts below are ours (wider addresses, an attention
mode, an IR-node reference for MISC); the tables are the single source of truth for the
encoder, decoder, validator and the spec's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError

QUEUES = ("LD", "ST", "MM", "MV", "MISC", "SYS")   # order fixes the bit of each queue in a mask
OPCODES = {"LD": 0b0001, "ST": 0b0010, "MM": 0b0011, "MV": 0b0100, "MISC": 0b0101, "SYS": 0b1111}
BY_OPCODE = {v: k for k, v in OPCODES.items()}
ADDR_UNIT = 64            # addresses count 64-byte units
ONCHIP_BIT = 1 << 31      # address space bit: set = on-chip activation buffer, clear = HBM
BUFFERS = ("A", "B", "META", "SCALE", "KV", "GLOBAL")   # LD/ST buffer field
MATRIX_MODES = ("weight", "matmul", "attn_qk", "attn_sv")
SYS_CODES = ("END", "BARRIER")
MAX_MISC_INPUTS = 15


class ISAError(BitsmithError, ValueError):
    """An instruction or stream that does not follow docs/fpga-isa.md (names the field)."""


@dataclass(frozen=True)
class Field:
    name: str
    word: int
    hi: int
    lo: int

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1


def _head(*rest: Field) -> tuple[Field, ...]:
    return (Field("opcode", 0, 31, 28), Field("wait", 0, 27, 23), Field("release", 0, 22, 18)) + rest


_LDST = _head(Field("buffer", 0, 17, 15), Field("channel", 0, 14, 10), Field("reserved", 0, 9, 0),
              Field("hbm_addr", 1, 31, 0), Field("buf_addr", 2, 31, 0), Field("length", 3, 31, 0))
_MATRIX = _head(Field("fmt", 0, 17, 14), Field("nm_n", 0, 13, 9), Field("nm_mlog2", 0, 8, 6),
                Field("bias", 0, 5, 5), Field("mask", 0, 4, 4), Field("mode", 0, 3, 2), Field("reserved", 0, 1, 0),
                Field("ref", 1, 31, 16), Field("rows", 1, 15, 0), Field("row0", 2, 31, 0),
                Field("a_addr", 3, 31, 0), Field("out_addr", 4, 31, 0), Field("m", 5, 31, 16),
                Field("kblocks", 5, 15, 0))
FORMATS: dict[str, tuple[Field, ...]] = {
    "LD": _LDST,
    "ST": _LDST,
    "MM": _MATRIX,
    "MV": _MATRIX,
    "MISC": _head(Field("misc_op", 0, 17, 10), Field("n_in", 0, 9, 6), Field("mask", 0, 5, 5),
                  Field("reserved", 0, 4, 0), Field("node", 1, 31, 0), Field("out_addr", 2, 31, 0)),
    "SYS": _head(Field("code", 0, 17, 14), Field("reserved", 0, 13, 0)),
}
BASE_WORDS = {k: 1 + max(f.word for f in fs) for k, fs in FORMATS.items()}
# fields whose value may differ between buckets of one template (docs/fpga-isa.md, templates)
PATCHABLE = frozenset({"hbm_addr", "buf_addr", "length", "a_addr", "out_addr", "row0", "kblocks", "m",
                       "rows", "in"})


@dataclass(frozen=True)
class Instr:
    """One decoded instruction. ``fields`` excludes opcode/wait/release; ``inputs`` are a MISC
    instruction's operand addresses (one extra word each)."""

    queue: str
    wait: frozenset[str] = frozenset()
    release: frozenset[str] = frozenset()
    fields: tuple[tuple[str, int], ...] = ()
    inputs: tuple[int, ...] = ()

    def get(self, name: str, default: int = 0) -> int:
        for k, v in self.fields:
            if k == name:
                return v
        return default

    @property
    def words(self) -> int:
        return BASE_WORDS[self.queue] + len(self.inputs)

    def with_flags(self, wait: Iterable[str], release: Iterable[str]) -> "Instr":
        return Instr(self.queue, frozenset(wait), frozenset(release), self.fields, self.inputs)


_FIELD_NAMES = {q: tuple(f.name for f in fs if f.name not in ("opcode", "wait", "release", "reserved"))
                for q, fs in FORMATS.items()}
_FIELD_SET = {q: frozenset(n) for q, n in _FIELD_NAMES.items()}
_NO_QUEUES: frozenset[str] = frozenset()


def make(queue: str, inputs: Sequence[int] = (), **fields: int) -> Instr:
    """An instruction without flags; ``fields`` are stored in format order (absent ones as 0), as
    the decoder returns them, so equal instructions compare equal."""
    names = _FIELD_NAMES.get(queue)
    if names is None:
        raise ISAError(f"unknown queue {queue!r}; valid: {QUEUES}")
    if not _FIELD_SET[queue].issuperset(fields):
        raise ISAError(f"{queue}: unknown fields {sorted(set(fields) - _FIELD_SET[queue])}; valid: {sorted(names)}")
    if queue == "MISC":
        fields["n_in"] = len(inputs)
    return Instr(queue, _NO_QUEUES, _NO_QUEUES, tuple((k, int(fields.get(k, 0))) for k in names),
                 tuple(int(a) for a in inputs))


def mask_of(queue: str, queues: Iterable[str]) -> int:
    """The 5-bit mask over the queues other than ``queue`` (first other queue = bit 4)."""
    if not queues:
        return 0
    others = [q for q in QUEUES if q != queue]
    value = 0
    for q in queues:
        if q == queue or q not in others:
            raise ISAError(f"{queue}: wait/release names {q!r}, which is not another queue")
        value |= 1 << (len(others) - 1 - others.index(q))
    return value


def queues_of(queue: str, mask: int) -> frozenset[str]:
    others = [q for q in QUEUES if q != queue]
    return frozenset(q for i, q in enumerate(others) if mask >> (len(others) - 1 - i) & 1)


_LAYOUT = {q: {f.name: (f.word, f.lo, 1 << f.width) for f in fs} for q, fs in FORMATS.items()}


def encode(ins: Instr) -> list[int]:
    q = ins.queue
    layout = _LAYOUT[q]
    words = [0] * BASE_WORDS[q]
    words[0] = OPCODES[q] << 28 | mask_of(q, ins.wait) << 23 | mask_of(q, ins.release) << 18
    for name, v in ins.fields:
        spec = layout.get(name)
        if spec is None or name in ("opcode", "wait", "release", "reserved"):
            raise ISAError(f"{q}: unknown field {name!r}")
        word, lo, top = spec
        if not 0 <= v < top:
            raise ISAError(f"{q}.{name} = {v} does not fit {top.bit_length() - 1} bits")
        words[word] |= v << lo
    if ins.queue == "MISC":
        if len(ins.inputs) > MAX_MISC_INPUTS:
            raise ISAError(f"MISC: {len(ins.inputs)} inputs, at most {MAX_MISC_INPUTS}")
        for a in ins.inputs:
            if not 0 <= a < 1 << 32:
                raise ISAError(f"MISC input address {a} does not fit 32 bits")
        words += list(ins.inputs)
    return words


def encode_stream(instrs: Iterable[Instr]) -> np.ndarray:
    out: list[int] = []
    for ins in instrs:
        out += encode(ins)
    return np.asarray(out, dtype="<u4")


def decode_one(words: Sequence[int], pos: int) -> tuple[Instr, int]:
    """The instruction starting at word ``pos`` and the position after it."""
    w0 = int(words[pos])
    queue = BY_OPCODE.get(w0 >> 28)
    if queue is None:
        raise ISAError(f"word {pos}: unknown opcode {w0 >> 28:#x}; valid: "
                       f"{', '.join(f'{v:#x} {k}' for k, v in OPCODES.items())}")
    n = BASE_WORDS[queue]
    if pos + n > len(words):
        raise ISAError(f"word {pos}: {queue} needs {n} words, the stream ends after {len(words) - pos}")
    vals: dict[str, int] = {}
    for f in FORMATS[queue]:
        v = (int(words[pos + f.word]) >> f.lo) & ((1 << f.width) - 1)
        if f.name == "reserved":
            if v:
                raise ISAError(f"word {pos}: {queue} has reserved bits set")
            continue
        vals[f.name] = v
    inputs: tuple[int, ...] = ()
    if queue == "MISC":
        k = vals["n_in"]
        if pos + n + k > len(words):
            raise ISAError(f"word {pos}: MISC with {k} inputs runs past the end of the stream")
        inputs = tuple(int(w) for w in words[pos + n:pos + n + k])
        n += k
    wait = queues_of(queue, vals.pop("wait"))
    release = queues_of(queue, vals.pop("release"))
    vals.pop("opcode")
    return Instr(queue, wait, release, tuple((k, vals[k]) for k in _FIELD_NAMES[queue]), inputs), pos + n


def decode_stream(words: np.ndarray | Sequence[int]) -> list[Instr]:
    out, pos = [], 0
    while pos < len(words):
        ins, pos = decode_one(words, pos)
        out.append(ins)
    return out


def queue_counts(instrs: Iterable[Instr]) -> dict[str, int]:
    counts = {q: 0 for q in QUEUES}
    for ins in instrs:
        counts[ins.queue] += 1
    return counts


@dataclass(frozen=True)
class StreamLimits:
    """What the validator checks references against (from the program that holds the stream)."""

    misc_ops: int = 256
    layers: int = 1 << 16
    nodes: int = 1 << 32
    node_inputs: Mapping[int, int] = field(default_factory=dict)   # node index -> input count
    fixed_inputs: Mapping[int, int] = field(default_factory=dict)  # misc_op -> input count (ops not an IR op)


def validate(instrs: Sequence[Instr], limits: StreamLimits = StreamLimits()) -> None:
    """Raises ISAError naming the instruction and field of the first malformed one: unknown
    enumerations, a MISC input count that is not the node's, dependency tokens that a queue
    waits for but nobody releases (a deadlock), a stream that does not end with SYS END."""
    if not instrs or instrs[-1].queue != "SYS" or SYS_CODES[instrs[-1].get("code")] != "END":
        raise ISAError("the stream must end with SYS END")
    released = {(p, c): 0 for p in QUEUES for c in QUEUES}
    for i, ins in enumerate(instrs):
        where = f"instruction {i} ({ins.queue})"
        for q in ins.wait | ins.release:
            if q == ins.queue or q not in QUEUES:
                raise ISAError(f"{where}: wait/release names {q!r}")
        if ins.queue in ("LD", "ST") and ins.get("buffer") >= len(BUFFERS):
            raise ISAError(f"{where}: buffer {ins.get('buffer')} unknown; valid 0..{len(BUFFERS) - 1} {BUFFERS}")
        if ins.queue in ("MM", "MV"):
            if ins.get("mode") >= len(MATRIX_MODES):
                raise ISAError(f"{where}: mode {ins.get('mode')} unknown")
            if MATRIX_MODES[ins.get("mode")] == "weight" and ins.get("ref") >= limits.layers:
                raise ISAError(f"{where}: layer {ins.get('ref')} is not in the program's layer table "
                               f"({limits.layers} layers)")
            if ins.get("nm_n") > 1 << ins.get("nm_mlog2"):
                raise ISAError(f"{where}: sparsity {ins.get('nm_n')}:{1 << ins.get('nm_mlog2')} has N > M")
        if ins.queue == "MISC":
            if ins.get("misc_op") >= limits.misc_ops:
                raise ISAError(f"{where}: misc_op {ins.get('misc_op')} not in the program's MISC table")
            node = ins.get("node")
            if node >= limits.nodes:
                raise ISAError(f"{where}: node {node} out of range ({limits.nodes} nodes)")
            op = ins.get("misc_op")
            want = limits.fixed_inputs[op] if op in limits.fixed_inputs else limits.node_inputs.get(node)
            if want is not None and want != len(ins.inputs):
                raise ISAError(f"{where}: {len(ins.inputs)} input addresses, misc_op {op} on node {node} takes {want}")
        if ins.queue == "SYS" and ins.get("code") >= len(SYS_CODES):
            raise ISAError(f"{where}: SYS code {ins.get('code')} unknown")
        for p in ins.release:
            released[(ins.queue, p)] += 1
    waits = {(p, c): 0 for p in QUEUES for c in QUEUES}
    for i, ins in enumerate(instrs):
        for p in ins.wait:
            waits[(p, ins.queue)] += 1
            if waits[(p, ins.queue)] > released[(p, ins.queue)]:
                raise ISAError(f"instruction {i} ({ins.queue}) waits for a {p} token that no {p} "
                               f"instruction releases (deadlock)")
