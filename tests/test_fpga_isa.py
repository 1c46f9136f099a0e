"""The FPGA ISA (docs/fpga-isa.md): encode/decode round trips for every instruction kind and
the validator's refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.backends.fpga import isa


@st.composite
def instructions(draw: st.DrawFn, queue: str | None = None) -> isa.Instr:
    q = queue or draw(st.sampled_from(isa.QUEUES))
    others = [o for o in isa.QUEUES if o != q]
    wait = draw(st.frozensets(st.sampled_from(others)))
    release = draw(st.frozensets(st.sampled_from(others)))
    fields = {}
    for f in isa.FORMATS[q]:
        if f.name in ("opcode", "wait", "release", "reserved", "n_in"):
            continue
        fields[f.name] = draw(st.integers(0, (1 << f.width) - 1))
    inputs = draw(st.lists(st.integers(0, (1 << 32) - 1), max_size=isa.MAX_MISC_INPUTS)) if q == "MISC" else []
    return isa.make(q, inputs, **fields).with_flags(wait, release)


@pytest.mark.parametrize("queue", isa.QUEUES)
@given(data=st.data())
@settings(max_examples=60, deadline=None)
def test_round_trip_every_kind(queue, data):
    ins = data.draw(instructions(queue))
    words = isa.encode(ins)
    assert len(words) == ins.words
    assert all(0 <= w < 1 << 32 for w in words)
    back, end = isa.decode_one(np.asarray(words, dtype="<u4"), 0)
    assert end == len(words)
    assert back == ins


@given(st.lists(instructions(), max_size=30))
@settings(max_examples=60, deadline=None)
def test_stream_round_trip(instrs):
    words = isa.encode_stream(instrs)
    assert isa.decode_stream(words) == instrs


def test_masks_follow_flightllm_order():
    # the first other queue is the highest bit (FlightLLM's wait_release_list_to_value)
    assert isa.mask_of("MM", ["LD"]) == 0b10000
    assert isa.mask_of("LD", ["SYS"]) == 0b00001
    assert isa.queues_of("MV", 0b11111) == frozenset(q for q in isa.QUEUES if q != "MV")


def _end():
    return isa.make("SYS", code=0)


@pytest.mark.parametrize("stream, message", [
    ([isa.make("LD", buffer=1, length=4)], "must end with SYS END"),
    ([isa.make("LD", buffer=7, length=4), _end()], "buffer 7 unknown"),
    ([isa.make("MV", mode=0, ref=5), _end()], "layer 5 is not in the program's layer table"),
    ([isa.make("MV", nm_n=8, nm_mlog2=2), _end()], "N > M"),
    ([isa.make("MISC", [1], misc_op=0, node=0), _end()], "1 input addresses, misc_op 0 on node 0 takes 2"),
    ([isa.make("MISC", [], misc_op=9, node=0), _end()], "misc_op 9 not in the program's MISC table"),
    ([isa.make("MM", mode=1).with_flags({"LD"}, ()), _end()], "waits for a LD token that no LD instruction releases"),
    ([isa.make("SYS", code=3), _end()], "SYS code 3 unknown"),
])
def test_validator_refuses(stream, message):
    limits = isa.StreamLimits(misc_ops=4, layers=2, nodes=3, node_inputs={0: 2})
    with pytest.raises(isa.ISAError, match=message):
        isa.validate(stream, limits)


def test_decoder_refuses_bad_words():
    with pytest.raises(isa.ISAError, match="unknown opcode"):
        isa.decode_stream(np.asarray([0x0], dtype="<u4"))
    words = isa.encode(isa.make("SYS", code=0))
    with pytest.raises(isa.ISAError, match="reserved bits"):
        isa.decode_stream(np.asarray([words[0] | 1], dtype="<u4"))
    ld = isa.encode(isa.make("LD", buffer=0, length=1))
    with pytest.raises(isa.ISAError, match="needs 4 words"):
        isa.decode_stream(np.asarray(ld[:2], dtype="<u4"))
    with pytest.raises(isa.ISAError, match="does not fit"):
        isa.encode(isa.make("MV", rows=1 << 16))
    with pytest.raises(isa.ISAError, match="not another queue"):
        isa.encode(isa.make("MV").with_flags({"MV"}, ()))
