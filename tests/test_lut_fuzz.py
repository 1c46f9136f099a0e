"""Fuzzing the LUT stream decoder and both validators: random and mutated programs are either
refused (ISAError / StreamError) or decoded and run, never a crash, and both executors agree.

Programs start valid (the code generator on random small layers) and are then mutated: bit
flips, field nudges, random words, inserted / deleted / duplicated / swapped words, words
spliced in from another layer, truncation, random header words, shortened operands and
corrupted outlier records. For every case:

* the C executor runs in a separate, long-lived process (lut_fuzz_worker.py): a crash there
  fails the test with the case, and the worker is restarted for the next one;
* the verdict of the C validator (``NativeExecutor.plan``) must equal the verdict of the
  Python transcription the reference executor uses (``validate.check_program``): the same
  error type, code and word, or both accept;
* an accepted program must give bit-identical outputs in the reference executor and in the C
  executor (int8 and fp32 tables, 1 and 2 threads): the spec fixes every float operation.

``pytest --hypothesis-profile stress`` runs 1000 examples per test instead of the defaults;
``--hypothesis-show-statistics`` lists the verdicts seen.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from bitsmith.backends.lut import isa, native, reference_executor, validate
from bitsmith.backends.lut.codegen import OUTLIER_DTYPE, LayerProgram, generate
from bitsmith.backends.lut.decompose import decompose

from bitsmith.backends.lut.codegen_bcq import generate_bcq
from bitsmith.ir.bcq import pack_planes

from lut_operands import LUT_SCHEMES, random_qlinear
from test_bcq_op import random_operands
from lut_fuzz_worker import read_message, write_message

HERE = Path(__file__).resolve().parent
BCQ_SCALES = ("pow2", "apot2", "fp16")  # bcq_linear programs among the base programs


def examples(default: int) -> int:
    """``default`` examples, or the active profile's count where a larger one is loaded
    (``--hypothesis-profile stress``: 1000), which an explicit max_examples would override."""
    return max(default, settings.default.max_examples) if settings.default.max_examples > 100 else default

TALLY: Counter = Counter()  # (test, verdict) -> cases; written to $BITSMITH_LUT_FUZZ_TALLY (JSON) at the end
CASES_PER_EXAMPLE = 6
REPLY_TIMEOUT_S = 60.0


class CWorker:
    """The C executor in a child process; restarted after a crash."""

    def __init__(self, library: Path, engine_isa: str) -> None:
        self.library, self.engine_isa = library, engine_isa
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE),
                                                             os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "2"}
        return subprocess.Popen([sys.executable, str(HERE / "lut_fuzz_worker.py"), str(self.library), self.engine_isa],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=str(HERE.parent))

    def run(self, prog: LayerProgram, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        try:
            write_message(self.proc.stdin, {"stream": prog.stream, "weights": prog.weights, "params": prog.params,
                                            "outliers": prog.outliers, "in_features": np.array(prog.in_features),
                                            "x": x})
            ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
            reply = read_message(self.proc.stdout) if ready else None
        except BrokenPipeError:
            reply = None
        if reply is None:
            self.proc.kill()
            code = self.proc.wait()
            self.proc = None
            pytest.fail(f"the C executor died or hung (exit status {code}) on stream "
                        f"{[hex(w) for w in prog.stream.tolist()][:64]}")
        return reply

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def c_worker(tmp_path_factory):
    if not native.cpu_has_avx2():
        pytest.skip("the fast executor needs AVX2/FMA")
    # the widest build this CPU runs (AVX-512 where present; CI's AVX2-only Zen 3 fuzzes the AVX2 build)
    engine_isa = native.choose_isa("host")
    lib = tmp_path_factory.mktemp("lutfuzz") / "lutexec.so"
    lib.write_bytes(native.build_library(isa=engine_isa))
    worker = CWorker(lib, engine_isa)
    yield worker
    worker.close()


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    path = os.environ.get("BITSMITH_LUT_FUZZ_TALLY")
    if path:
        Path(path).write_text(json.dumps({f"{t} | {v}": n for (t, v), n in sorted(TALLY.items())}, indent=1))


# ---------------------------------------------------------------- programs and mutations

@st.composite
def base_programs(draw) -> LayerProgram:
    scheme = draw(st.sampled_from(LUT_SCHEMES + BCQ_SCALES))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 100))
    gs = 4 * draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table_group = draw(st.sampled_from([4, 8, 16, 32]))
    if scheme in BCQ_SCALES:  # binary-coded planes: BCQMUL / BCQACC instructions
        signs, scales = random_operands(rng, draw(st.integers(1, 5)), n, k, gs, scheme)
        attrs = dict(bits=signs.shape[0], group_size=gs, in_features=k, out_features=n, scale=scheme, bias=False)
        return generate_bcq(attrs, [pack_planes(signs), scales], table_group)
    attrs, ops = random_qlinear(rng, scheme, n, k, gs, draw(st.booleans()))
    return generate(decompose(attrs, ops), table_group)


def _fields(word: int) -> tuple[isa.Field, ...]:
    fmt = isa.BY_OPCODE.get(word & 0xFF)
    return fmt.fields if fmt is not None else ()


def _nudge(words: list[int], pos: int, which: int, delta: int) -> None:
    """Adds ``delta`` to one field of word ``pos`` (wrapping within the field's width)."""
    fields = _fields(words[pos])
    if not fields:
        words[pos] ^= 1 << (8 + which % 56)
        return
    f = fields[which % len(fields)]
    mask = ((1 << f.width) - 1) << f.lo
    value = (((words[pos] & mask) >> f.lo) + delta) % (1 << f.width)
    words[pos] = (words[pos] & ~mask) | (value << f.lo)


@st.composite
def field_words(draw, small: bool = False) -> int:
    """A word with a known opcode and random raw field values (small ones: likely in range)."""
    fmt = draw(st.sampled_from(list(isa.FORMATS.values())))
    word = fmt.opcode
    for f in fmt.fields:
        top = (1 << f.width) - 1
        word |= draw(st.integers(0, min(top, 3)) if small else st.integers(0, top)) << f.lo
    return word


MUTATIONS = ("flip", "nudge", "random_word", "opcode_word", "insert", "delete", "duplicate", "swap", "splice",
             "truncate", "header", "weights", "params", "outlier")
u64 = st.integers(0, 2**64 - 1)


@st.composite
def mutated(draw, prog: LayerProgram, other: LayerProgram) -> tuple[LayerProgram, list[str]]:
    words = prog.stream.tolist()
    weights, params, outliers = prog.weights, prog.params, prog.outliers.copy()
    done = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS + ("nudge",) * 6))  # nudges keep more streams valid
        done.append(kind)
        # instructions, not the header (the "header" and "truncate" kinds cover that)
        pos = draw(st.integers(min(isa.HEADER_WORDS, max(len(words) - 1, 0)), max(len(words) - 1, 0)))
        if not words:
            words = [draw(u64)]
            continue
        if kind == "flip":
            words[pos] ^= 1 << draw(st.integers(0, 63))
        elif kind == "nudge":  # small field changes: the streams most likely to stay valid
            _nudge(words, max(pos, isa.HEADER_WORDS) % len(words), draw(st.integers(0, 7)),
                   draw(st.sampled_from([-16, -2, -1, 1, 2, 16])))
        elif kind == "random_word":
            words[pos] = draw(u64)
        elif kind == "opcode_word":  # a known opcode with random fields
            words[pos] = (draw(u64) & ~0xFF) | draw(st.integers(0, 8))
        elif kind == "insert":
            words.insert(pos, draw(st.one_of(u64, st.sampled_from(words))))
        elif kind == "delete":
            del words[pos]
        elif kind == "duplicate":
            words.insert(draw(st.integers(0, len(words))), words[pos])
        elif kind == "swap":
            other_pos = draw(st.integers(0, len(words) - 1))
            words[pos], words[other_pos] = words[other_pos], words[pos]
        elif kind == "splice":
            src = other.stream.tolist()
            a = draw(st.integers(0, len(src) - 1))
            b = draw(st.integers(a, min(len(src), a + 8)))
            end = draw(st.integers(pos, min(len(words), pos + 8)))
            words[pos:end] = src[a:b]
        elif kind == "truncate":
            words = words[:pos]
        elif kind == "header":
            h = draw(st.integers(0, isa.HEADER_WORDS - 1))
            if h < len(words):
                words[h] = draw(st.one_of(u64, st.integers(0, 64), st.just(words[h] ^ (1 << draw(st.integers(0, 63))))))
        elif kind == "weights":  # whole words mostly (else lut_plan refuses the size itself)
            weights = weights[:draw(st.one_of(st.integers(0, weights.size // 32).map(lambda w: 32 * w),
                                              st.integers(0, weights.size)))]
        elif kind == "params":
            params = params[:draw(st.one_of(st.integers(0, params.size // 32).map(lambda b: 32 * b),
                                            st.integers(0, params.size)))]
        elif kind == "outlier" and outliers.size:
            r = draw(st.integers(0, outliers.size - 1))
            outliers["row" if draw(st.booleans()) else "col"][r] = draw(st.integers(-2**31, 2**31 - 1))
    stream = np.array(words, dtype=np.uint64)
    return LayerProgram(stream, np.ascontiguousarray(weights), np.ascontiguousarray(params),
                        np.ascontiguousarray(outliers, OUTLIER_DTYPE), prog.in_features), done


def _python_verdict(prog: LayerProgram) -> str:
    try:
        validate.check_program(prog)
    except (isa.ISAError, validate.StreamError) as e:
        return f"{type(e).__name__}: {e}"
    return "accepted"


def _check_case(c_worker: CWorker, prog: LayerProgram, x: np.ndarray, test: str) -> str:
    reply = c_worker.run(prog, x)
    c_verdict = str(reply["verdict"])
    assert c_verdict == _python_verdict(prog), "the C and Python validators disagree"
    kind = c_verdict.split(" at word")[0].split(" does not pad")[0]
    kind = kind.split(", this runtime")[0] if "version" not in kind else "ISAError: LUT stream version"
    event(f"verdict: {kind}")
    TALLY[(test, kind)] += 1
    if c_verdict != "accepted":
        with pytest.raises((isa.ISAError, validate.StreamError)) as info:
            reference_executor.run(prog, x)
        assert f"{type(info.value).__name__}: {info.value}" == c_verdict
        return c_verdict
    for int8 in (True, False):
        want = reference_executor.run(prog, x, int8)
        for threads in (1, 2):
            got = reply[f"y_{int(int8)}_{threads}"]
            assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), \
                f"C and reference executors differ (int8={int8}, threads={threads})"
    return c_verdict


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), prog=base_programs(), other=base_programs(), m=st.integers(1, 5))
def test_mutated_streams_are_refused_or_run_identically(c_worker, data, prog, other, m):
    x = np.random.default_rng(m).normal(0, 1, (m, prog.in_features)).astype(np.float32)
    assert _check_case(c_worker, prog, x, "base") == "accepted"   # the unmutated program
    for _ in range(CASES_PER_EXAMPLE):
        bad, kinds = data.draw(mutated(prog, other))
        event(f"mutations: {len(kinds)}")
        _check_case(c_worker, bad, x, "mutated")


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.one_of(u64, field_words(), field_words(small=True)), min_size=0, max_size=40),
       header=st.booleans(), in_features=st.integers(1, 64), m=st.integers(1, 3))
def test_random_words_are_refused_or_run_identically(c_worker, words, header, in_features, m):
    """Random words, behind a plausible header half of the time, with small random operands."""
    rng = np.random.default_rng(len(words))
    kpad = 4 * -(-in_features // 4)
    head = isa.StreamHeader(rng.integers(1, 17), kpad, rng.integers(0, kpad // 4 + 1), 4).words().tolist() \
        if header else []
    outliers = np.zeros(3, OUTLIER_DTYPE)
    outliers["row"], outliers["col"], outliers["val"] = [0, 15, 3], [0, kpad - 1, 1], [0.5, -1.0, 2.0]
    prog = LayerProgram(np.array(head + words, np.uint64), rng.integers(0, 256, 32 * 8).astype(np.uint8),
                        rng.normal(0, 1, 32 * 4).astype(np.float32), outliers, in_features)
    _check_case(c_worker, prog, rng.normal(0, 1, (m, in_features)).astype(np.float32), "random words")


def _ins(name: str, **fields: int) -> int:
    return int(isa.encode([isa.Instruction.make(name, **fields)])[0])


@st.composite
def random_programs(draw) -> list[int]:
    """Header, TABLEs, SYNC, tiles of random LUTACC/SCALE/OUTLIER, STOREs, END: random meaning in
    a mostly valid structure (fields drawn near their valid ranges, sometimes past them), so
    many are accepted and both executors run them."""
    kg = draw(st.integers(1, 6))
    tiles = draw(st.integers(1, 3))
    n = draw(st.integers(1, 16 * tiles))
    small = st.integers(0, 2)  # how far past a valid range a field may go
    cuts = sorted(draw(st.sets(st.integers(1, kg - 1), max_size=kg - 1))) if kg > 1 else []
    bounds = list(zip([0] + cuts, cuts + [kg]))
    blocks = len(bounds)
    tables = [_ins("TABLE", block=b, kg0=lo, nkg=hi - lo) for b, (lo, hi) in enumerate(bounds)]
    tables = draw(st.permutations(tables))[:len(tables) - draw(st.integers(0, 1))]  # maybe one missing
    body = []
    for t in range(tiles):
        body.append(_ins("TILE", wptr=draw(st.integers(0, 6))))
        for _ in range(draw(st.integers(0, 6))):
            kind = draw(st.sampled_from(["LUTACC", "LUTACC", "SCALE", "OUTLIER"]))
            if kind == "LUTACC":
                body.append(_ins("LUTACC", mode=draw(st.integers(0, 1)), plane=draw(st.integers(0, 12)),
                                 kg0=draw(st.integers(0, kg)), nwords=draw(st.integers(1, 3)),
                                 block=draw(st.integers(0, blocks - 1)) + draw(small) // 2))
            elif kind == "SCALE":
                body.append(_ins("SCALE", block0=draw(st.integers(0, blocks - 1)), nblocks=draw(st.integers(1, 2)),
                                 pidx=draw(st.integers(0, 8))))
            else:
                body.append(_ins("OUTLIER", start=draw(st.integers(0, 3)), count=draw(st.integers(1, 2))))
        row0 = min(16 * t, n - 1) + draw(small) // 2
        body.append(_ins("STORE", row0=row0, nrows=min(16, max(1, min(16, n - row0)) + draw(small) // 2)))
    head = isa.StreamHeader(n, 4 * kg, blocks, 4).words().tolist()
    return head + tables + [_ins("SYNC")] + body + [_ins("END")]


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(words=random_programs(), m=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_random_programs_are_refused_or_run_identically(c_worker, words, m, seed):
    rng = np.random.default_rng(seed)
    kpad = (words[2] >> 32)
    outliers = np.zeros(4, OUTLIER_DTYPE)
    outliers["row"], outliers["col"] = rng.integers(0, 16, 4), rng.integers(0, kpad, 4)
    outliers["val"] = rng.normal(0, 1, 4)
    in_features = kpad - int(rng.integers(0, 4))
    prog = LayerProgram(np.array(words, np.uint64), rng.integers(0, 256, 32 * 12).astype(np.uint8),
                        rng.normal(0, 1, 32 * 8).astype(np.float32), outliers, in_features)
    _check_case(c_worker, prog, rng.normal(0, 1, (m, in_features)).astype(np.float32), "random programs")


@settings(max_examples=examples(300), deadline=None)
@given(words=st.lists(st.one_of(u64, field_words()), min_size=1, max_size=8))
def test_decoder_refuses_or_round_trips_random_words(words):
    """Every 64-bit word either decodes to an instruction that encodes back to the same word, or
    raises ISAError (unknown opcode, stray bits, a field above its cap)."""
    try:
        decoded = isa.decode(np.array(words, np.uint64))
    except isa.ISAError:
        TALLY[("decoder", "refused")] += 1
    else:
        TALLY[("decoder", "decoded")] += 1
        assert isa.encode(decoded).tolist() == words


@settings(max_examples=examples(200), deadline=None)
@given(magic=st.sampled_from([isa.MAGIC, isa.MAGIC ^ 1]), version=st.sampled_from([isa.VERSION, 0, 2, 255]),
       planes=st.integers(0, 255), high=st.one_of(st.just(0), u64.map(lambda w: w & ~0xFFFF)),
       shape=u64, blocks=u64)
def test_header_parser_refuses_or_round_trips(magic, version, planes, high, shape, blocks):
    words = [magic, version | planes << 8 | high, shape, blocks]
    valid = magic == isa.MAGIC and version == isa.VERSION and high == 0
    try:
        head = isa.StreamHeader.parse(np.array(words, np.uint64))
    except isa.ISAError:
        assert not valid
    else:
        assert valid and head.words().tolist() == words
