"""Stream validation, the same rules as the C executor's (``native/lutexec.c``: validate, lut_plan).

Both executors refuse exactly the same programs with the same message: the fast executor runs
the C validator, the reference executor this transcription of it, and tests/test_lut_fuzz.py
checks on random and mutated streams that the two verdicts (error code and word) agree and
that an accepted stream gives bit-identical results in both. The rules (docs/lut-isa.md, 5):

* operands: C-contiguous arrays of the spec's dtypes; the header's Kpad is ``in_features``
  rounded up to a multiple of 4; weight bytes and parameter floats whole words / blocks;
* header: magic, version, no bits above the planes byte, N >= 1, Kpad a multiple of 4,
  blocks <= Kpad / 4, N <= 16 x (number of TILEs);
* order: TABLEs, SYNC, then tiles (TILE, LUTACC/SCALE/OUTLIER..., STORE), then END as the last word;
* TABLEs build distinct blocks over disjoint quads; LUTACC/BCQACC/SCALE name built blocks; a
  BCQACC's slots 0..npairs-1 were set by BCQMULs earlier in its tile; every
  field within the header and the operand sizes; STOREs write each output row at most once
  (tiles run in parallel); outlier records index a tile row (< 16) and an activation (< Kpad).
"""

from __future__ import annotations

import numpy as np

from ...errors import BitsmithError
from . import isa
from .codegen import OUTLIER_DTYPE, LayerProgram

ERR_HEADER, ERR_OPCODE, ERR_TABLE, ERR_WEIGHTS, ERR_LUTACC, ERR_SCALE, ERR_OUTLIER, ERR_STORE, ERR_ORDER, \
    ERR_MEMORY, ERR_ARGS, ERR_LAUNCH = range(1, 13)
ERRORS = {ERR_HEADER: "bad stream header", ERR_OPCODE: "unknown opcode", ERR_TABLE: "TABLE out of range",
          ERR_WEIGHTS: "weight words out of range", ERR_LUTACC: "LUTACC field out of range",
          ERR_SCALE: "SCALE out of range", ERR_OUTLIER: "OUTLIER out of range", ERR_STORE: "STORE out of range",
          ERR_ORDER: "instruction out of order", ERR_MEMORY: "out of memory", ERR_ARGS: "bad arguments",
          ERR_LAUNCH: "the parallel launcher failed"}
OPERAND_DTYPES = (("stream", np.dtype("<u8")), ("weights", np.dtype("u1")), ("params", np.dtype("<f4")),
                  ("outliers", OUTLIER_DTYPE))
_OP = {f.name: f.opcode for f in isa.FORMATS.values()}


class StreamError(BitsmithError, ValueError):
    """An executor refused a stream (both validate every instruction before running)."""


def refusal(code: int) -> StreamError:
    """The error for ``lut_plan``'s return value ``(word << 8) | error``."""
    return StreamError(f"LUT executor refused the stream: {ERRORS.get(code & 0xFF, 'error')} at word {code >> 8}")


def check_operands(program: LayerProgram) -> isa.StreamHeader:
    """The checks made in Python before either validator runs: the header parses (ISAError),
    the arrays have the spec's dtypes, and the header's Kpad is the layer's padded input size
    (which also bounds every allocation the executors make from the header)."""
    head = program.header
    for role, dtype in OPERAND_DTYPES:
        a = getattr(program, role)
        if a.dtype != dtype or not a.flags.c_contiguous:
            raise StreamError(f"LUT program {role} must be C-contiguous {dtype}, got {a.dtype}"
                              f"{'' if a.flags.c_contiguous else ' (strided)'}")
    if head.padded_in != 4 * -(-program.in_features // 4):
        raise StreamError(f"LUT stream header Kpad {head.padded_in} does not pad the layer's "
                          f"{program.in_features} inputs to a multiple of 4")
    return head


def stream_code(program: LayerProgram) -> int:
    """0 if the stream is valid for its operands, else ``(word << 8) | error`` exactly as the C
    ``lut_plan`` returns it (call ``check_operands`` first)."""
    wbytes, pfloats = program.weights.size, program.params.size
    if wbytes % isa.WORD_BYTES or pfloats % isa.PARAM_FLOATS:
        return ERR_ARGS
    err, kpad = _validate(program.stream.tolist(), wbytes // isa.WORD_BYTES, pfloats // isa.PARAM_FLOATS,
                          program.outliers.size)
    if err:
        return err
    o = program.outliers
    if o.size and (o["row"].min() < 0 or o["row"].max() >= 16 or o["col"].min() < 0 or o["col"].max() >= kpad):
        return ERR_OUTLIER
    return 0


def check_program(program: LayerProgram) -> isa.StreamHeader:
    """Raises what the fast executor raises for ``program`` (ISAError or StreamError)."""
    head = check_operands(program)
    code = stream_code(program)
    if code:
        raise refusal(code)
    return head


def _field(w: int, lo: int, width: int) -> int:
    return (w >> lo) & ((1 << width) - 1)


def _validate(s: list[int], wwords: int, pblocks: int, nout: int) -> tuple[int, int]:
    """(error code, Kpad): lutexec.c's validate(), statement by statement."""
    nw = len(s)
    if nw < isa.HEADER_WORDS + 1 or s[0] != isa.MAGIC or s[1] & 0xFF != isa.VERSION or s[1] >> 16:
        return ERR_HEADER, 0
    n, kpad, blocks = s[2] & 0xFFFFFFFF, s[2] >> 32, s[3]
    if kpad % 4 or n <= 0:
        return ERR_HEADER, kpad
    kg = kpad // 4
    tiles = sum(1 for w in s[isa.HEADER_WORDS:] if w & 0xFF == _OP["TILE"])
    if blocks > kg or n > 16 * tiles:  # blocks is int64 in C: values >= 2**63 are negative there
        return ERR_HEADER, kpad
    built = np.zeros(blocks + 1, bool)
    covered = np.zeros(kg + 1, bool)
    stored = np.zeros(n, bool)
    phase, wptr = 0, 0  # phase 0 tables, 1 between tiles, 2 inside a tile, 3 ended
    slots = 0           # BCQMUL slots set in the current tile (bit per slot)
    for i in range(isa.HEADER_WORDS, nw):
        w = s[i]
        op = w & 0xFF
        if op == _OP["TABLE"]:
            g, kg0, nkg = _field(w, 8, 20), _field(w, 28, 20), _field(w, 48, 16) + 1
            if phase != 0:
                return (i << 8) | ERR_ORDER, kpad
            if g >= blocks or kg0 + nkg > kg or built[g] or covered[kg0:kg0 + nkg].any():
                return (i << 8) | ERR_TABLE, kpad
            covered[kg0:kg0 + nkg] = True
            built[g] = True
        elif op == _OP["SYNC"]:
            if phase != 0 or w >> 8:
                return (i << 8) | ERR_ORDER, kpad
            phase = 1
        elif op == _OP["TILE"]:
            if phase != 1:
                return (i << 8) | ERR_ORDER, kpad
            wptr = _field(w, 8, 56)
            phase = 2
            slots = 0
        elif op == _OP["LUTACC"]:
            quad = _field(w, 8, 1) == 0
            plane, kg0, nwords, block = _field(w, 9, 4), _field(w, 13, 20), _field(w, 33, 7) + 1, _field(w, 40, 20)
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            if w >> 60 or block >= blocks or not built[block] or plane + (3 if quad else 1) > 15 \
                    or nwords > (64 if quad else 32) or kg0 + (nwords if quad else 2 * nwords) > kg + 1:
                return (i << 8) | ERR_LUTACC, kpad
            if wptr + nwords > wwords:
                return (i << 8) | ERR_WEIGHTS, kpad
            wptr += nwords
        elif op == _OP["BCQMUL"]:
            slot, kind = _field(w, 8, 2), _field(w, 10, 1)
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            if w >> 11:
                return (i << 8) | ERR_LUTACC, kpad
            if wptr + isa.BCQ_MUL_WORDS[kind] > wwords:
                return (i << 8) | ERR_WEIGHTS, kpad
            wptr += isa.BCQ_MUL_WORDS[kind]
            slots |= 1 << slot
        elif op == _OP["BCQACC"]:
            npairs, kg0, nwords, block = _field(w, 8, 2) + 1, _field(w, 10, 20), _field(w, 30, 6) + 1, _field(w, 36, 20)
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            need = (1 << npairs) - 1
            if w >> 56 or block >= blocks or not built[block] or slots & need != need \
                    or kg0 + 2 * nwords > kg + 1:
                return (i << 8) | ERR_LUTACC, kpad
            if wptr + npairs * nwords > wwords:
                return (i << 8) | ERR_WEIGHTS, kpad
            wptr += npairs * nwords
        elif op == _OP["SCALE"]:
            b0, nb = _field(w, 8, 20), _field(w, 28, 8) + 1
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            if b0 + nb > blocks or _field(w, 36, 28) >= pblocks or not built[b0:b0 + nb].all():
                return (i << 8) | ERR_SCALE, kpad
        elif op == _OP["OUTLIER"]:
            start, count = _field(w, 8, 36), _field(w, 44, 20) + 1
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            if start + count > nout:
                return (i << 8) | ERR_OUTLIER, kpad
        elif op == _OP["STORE"]:
            row0, nrows = _field(w, 8, 32), _field(w, 40, 5) + 1
            if phase != 2:
                return (i << 8) | ERR_ORDER, kpad
            if w >> 45 or nrows > 16 or row0 + nrows > n or stored[row0:row0 + nrows].any():
                return (i << 8) | ERR_STORE, kpad
            stored[row0:row0 + nrows] = True
            phase = 1
        elif op == _OP["END"]:
            if phase != 1 or w >> 8 or i != nw - 1:
                return (i << 8) | ERR_ORDER, kpad
            phase = 3
        else:
            return (i << 8) | ERR_OPCODE, kpad
    return (0 if phase == 3 else (nw << 8) | ERR_ORDER), kpad
