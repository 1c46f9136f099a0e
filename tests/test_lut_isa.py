"""LUT ISA (docs/lut-isa.md): encoder/decoder round trip, field ranges, header, C constants."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitsmith.backends.lut import isa
from bitsmith.backends.lut.native import source_text


@st.composite
def instructions(draw) -> isa.Instruction:
    fmt = draw(st.sampled_from(sorted(isa.FORMATS.values(), key=lambda f: f.opcode)))
    fields = {f.name: draw(st.integers(f.minimum, f.maximum)) for f in fmt.fields}
    return isa.Instruction.make(fmt.name, **fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(instructions(), max_size=30))
def test_encode_decode_round_trip(instrs):
    words = isa.encode(instrs)
    assert words.dtype == np.uint64 and words.shape == (len(instrs),)
    assert isa.decode(words) == instrs
    assert np.array_equal(isa.encode(isa.decode(words)), words)


@settings(max_examples=100, deadline=None)
@given(st.lists(instructions(), min_size=1, max_size=30))
def test_vectorized_encoder_matches_single(instrs):
    for ins in instrs:
        cols = {k: np.array([v, v]) for k, v in ins.args}
        assert np.array_equal(isa.encode_columns(ins.op, 2, **cols), np.repeat(isa.encode([ins]), 2))


def test_fields_fit_in_64_bits_without_overlap():
    for fmt in isa.FORMATS.values():
        used = 0xFF
        for f in fmt.fields:
            mask = ((1 << f.width) - 1) << f.lo
            assert used & mask == 0, (fmt.name, f.name)
            used |= mask
        assert used < 1 << 64


def test_out_of_range_and_unknown_are_refused():
    with pytest.raises(isa.ISAError, match="nwords"):
        isa.Instruction.make("LUTACC", mode=0, plane=0, kg0=0, nwords=0)
    with pytest.raises(isa.ISAError, match="out of range"):
        isa.encode_columns("STORE", 1, row0=0, nrows=17)
    with pytest.raises(isa.ISAError, match="unknown opcode"):
        isa.decode(np.array([0xEE], np.uint64))
    with pytest.raises(isa.ISAError, match="outside its fields"):
        isa.decode(np.array([isa.FORMATS["SYNC"].opcode | (1 << 20)], np.uint64))
    with pytest.raises(isa.ISAError, match="unknown LUT instruction"):
        isa.Instruction.make("JUMP")


@given(st.integers(1, 2**32 - 1), st.integers(1, 2**30 - 1).map(lambda k: 4 * k), st.integers(1, 2**20),
       st.integers(1, 8))
def test_header_round_trip(n, kpad, groups, planes):
    h = isa.StreamHeader(n, kpad, groups, planes)
    assert isa.StreamHeader.parse(h.words()) == h


@pytest.mark.parametrize("field, header", [("out_features", (2**32, 4, 1, 1)), ("padded_in", (1, 2**32, 1, 1)),
                                           ("planes", (1, 4, 1, 256))])
def test_header_field_overflow_is_refused(field, header):
    with pytest.raises(isa.ISAError, match=field):
        isa.StreamHeader(*header).words()


def test_c_executor_uses_the_same_opcodes_and_fields():
    """The C decoder hard-codes the layout: check its constants against the Python tables."""
    src = source_text().decode()
    for fmt in isa.FORMATS.values():
        assert re.search(rf"OP_{fmt.name} = {fmt.opcode}\b", src), fmt.name
        for f in fmt.fields:
            # every field is read as FIELD(w, lo, width) (+ 1 for fields with minimum 1)
            assert f"FIELD(w, {f.lo}, {f.width})" in src or f"FIELD(s[i], {f.lo}, {f.width})" in src, (fmt.name, f.name)
    assert hex(isa.MAGIC) + "ULL" in src
