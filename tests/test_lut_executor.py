"""LUT code generation and both executors against the IR's dequantize (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitsmith.backends.lut import isa, native, reference_executor
from bitsmith.backends.lut.codegen import generate, plane_units
from bitsmith.backends.lut.decompose import decompose
from bitsmith.errors import UnsupportedOpError
from bitsmith.ir.quantized import dequantize

from bitsmith.ir.quant_grids import get_scheme
from lut_operands import GGUF_SCHEMES, LUT_SCHEMES, engine_magnitude as _magnitude, int8_table_bound, random_qlinear

EPS32 = float(np.finfo(np.float32).eps)
needs_avx2 = pytest.mark.skipif(not native.cpu_has_avx2(), reason="the fast executor needs AVX2/FMA")


@pytest.fixture(scope="module", params=sorted(native.ENGINE_ISAS))
def fast(request):
    """Each build of the engine this CPU runs (CI: AVX2-only Zen 3 runs the avx2 build only)."""
    if not native.cpu_runs(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} build of the fast executor")
    return native.load_library(native.build_library(isa=request.param), request.param)


@st.composite
def layers(draw):
    """Every LUT scheme, the GGUF types included (their fixed block size; float offsets refuse outliers)."""
    scheme = draw(st.sampled_from(LUT_SCHEMES + GGUF_SCHEMES))
    n, k = draw(st.integers(1, 40)), draw(st.integers(1, 300))
    gs = get_scheme(scheme).block_size or 4 * draw(st.integers(1, 80))
    m = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    outliers = draw(st.booleans()) and not get_scheme(scheme).offsets
    rng = np.random.default_rng(seed)
    attrs, ops = random_qlinear(rng, scheme, n, k, gs, outliers)
    x = rng.normal(0, 1, (m, k)).astype(np.float32)
    return attrs, ops, x


@settings(max_examples=60, deadline=None)
@given(layers())
def test_integer_form_is_exactly_the_dequantized_weight(layer):
    attrs, ops, _ = layer
    w = decompose(attrs, ops)
    assert w.u.max(initial=0) < 1 << w.planes
    assert np.array_equal(w.dense(), dequantize(attrs, ops))


@settings(max_examples=60, deadline=None)
@given(layers())
def test_fp32_tables_match_the_dense_product(layer):
    attrs, ops, x = layer
    y = reference_executor.run(generate(decompose(attrs, ops)), x, int8_tables=False)
    want = x.astype(np.float64) @ dequantize(attrs, ops).T.astype(np.float64)
    mag, _ = _magnitude(attrs, ops, x)
    # float32 sums of at most K/4 + 8 rounded terms, each at most `mag`: a first-order bound
    bound = (x.shape[1] / 4 + 8) * EPS32 * mag + 1e-30
    assert np.all(np.abs(y - want) <= bound)


@settings(max_examples=60, deadline=None)
@given(layers())
def test_int8_tables_stay_within_the_table_quantization_bound(layer):
    attrs, ops, x = layer
    prog = generate(decompose(attrs, ops))
    y = reference_executor.run(prog, x, int8_tables=True)
    want = x.astype(np.float64) @ dequantize(attrs, ops).T.astype(np.float64)
    mag, w = _magnitude(attrs, ops, x)
    # each int8 entry is off by at most ts/2 = max|T|/254 of its group; a weight's planes weigh
    # 1 + 2 + ... + 2**(P-1), so group g contributes at most |s| * ts_g/2 * quads_g * (2**P - 1)
    bound = int8_table_bound(x, w) * (1 + 1e-5) + (x.shape[1] / 4 + 8) * EPS32 * mag + 1e-30
    assert np.all(np.abs(y - want) <= bound)


@needs_avx2
@settings(max_examples=60, deadline=None)
@given(layers(), st.booleans(), st.sampled_from([4, 32, 64, 256]))
def test_fast_and_reference_executors_agree_bit_exactly(fast, layer, int8, table_group):
    # both run the documented float32 operation order, and integer table sums are exact
    attrs, ops, x = layer
    prog = generate(decompose(attrs, ops), table_group)
    assert np.array_equal(fast.run(prog, x, int8, threads=2), reference_executor.run(prog, x, int8))


@needs_avx2
def test_thread_count_does_not_change_results(fast):
    attrs, ops = random_qlinear(np.random.default_rng(3), "bitmod-w4", 200, 96, 32, True)
    prog = generate(decompose(attrs, ops))
    x = np.random.default_rng(4).normal(size=(7, 96)).astype(np.float32)
    assert np.array_equal(fast.run(prog, x, True, 1), fast.run(prog, x, True, 2))


@needs_avx2
def test_concurrent_callers_share_the_engine_pool_and_get_exact_results(fast):
    """The engine's own thread pool serves one call at a time; callers that overlap it (several
    sessions in one process) run on their own thread. Every caller, pooled or not, at every
    thread count (0 = one per CPU, 3 > this 2-core machine), gets the 1-thread result exactly,
    and the reference executor's."""
    import threading
    attrs, ops = random_qlinear(np.random.default_rng(11), "rtn-int4", 512, 384, 128, True)
    prog = generate(decompose(attrs, ops))
    xs = [np.random.default_rng(12 + i).normal(size=(1 + i % 3, 384)).astype(np.float32) for i in range(6)]
    want = [reference_executor.run(prog, x, True) for x in xs]
    assert all(np.array_equal(fast.run(prog, x, True, 1), w) for x, w in zip(xs, want))
    bad, start = [], threading.Barrier(6)

    def caller(i):
        start.wait()  # all callers begin together, so their calls overlap
        for rep in range(30):
            threads = (0, 2, 3)[(i + rep) % 3]
            if not np.array_equal(fast.run(prog, xs[i], True, threads), want[i]):
                bad.append((i, rep, threads))

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not bad


_LAUNCHER_CHECK = """
import numpy as np, tvm
from bitsmith.backends.lut import native
from bitsmith.backends.lut.codegen import generate
from bitsmith.backends.lut.decompose import decompose
from lut_operands import random_qlinear
from bitsmith.backends.tvm import runtime_cpu
runtime_cpu.set_threads(3)   # as the tvm-llvm host does
assert runtime_cpu.num_threads() == 3, runtime_cpu.num_threads()
fast = native.load_library(native.build_library())
launcher = native.tvm_parallel_launcher()
assert launcher
attrs, ops = random_qlinear(np.random.default_rng(5), "rtn-int3", 300, 128, 32, True)
prog = generate(decompose(attrs, ops))
x = np.random.default_rng(6).normal(size=(5, 128)).astype(np.float32)
for int8 in (True, False):
    want = fast.run(prog, x, int8, 1)
    for threads in (0, 2, 8):  # 8 > the pool: the engine uses the pool as the host sized it
        assert np.array_equal(fast.run(prog, x, int8, threads, launcher=launcher), want)
print("ok")
"""


@needs_avx2
def test_tvm_thread_pool_launcher_gives_the_same_results():
    """Hosted by tvm-llvm, the engine splits its work over TVM's pool (TVMBackendParallelLaunch).
    A fresh process with a 3-thread pool, so the split really runs on several tasks even on a
    2-core machine."""
    pytest.importorskip("tvm", reason="the TVM thread pool launcher needs apache-tvm")
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "TVM_NUM_THREADS": "3", "PYTHONPATH": str(Path(__file__).parent)}
    res = subprocess.run([sys.executable, "-c", _LAUNCHER_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


@needs_avx2
def test_bad_outputs_and_programs_are_refused(fast):
    attrs, ops = random_qlinear(np.random.default_rng(9), "rtn-int4", 32, 64, 32)
    prog = generate(decompose(attrs, ops))
    x = np.ones((2, 64), np.float32)
    with pytest.raises(native.StreamError, match="output must be C-contiguous float32"):
        fast.run(prog, x, out=np.zeros((2, 32), np.float64))
    with pytest.raises(native.StreamError, match="output must be C-contiguous float32"):
        fast.run(prog, x, out=np.zeros((2, 31), np.float32))
    buf = np.zeros(192, np.float32)
    with pytest.raises(native.StreamError, match="must not overlap"):
        fast.run(prog, buf[:128].reshape(2, 64), out=buf[64:128].reshape(2, 32))
    with pytest.raises(native.StreamError, match="not C-contiguous"):
        fast.run(prog, x, out=np.zeros((2, 64), np.float32)[:, :32])
    with pytest.raises(native.StreamError, match="weights must be C-contiguous uint8"):
        fast.run(type(prog)(prog.stream, prog.weights.astype(np.uint16), prog.params, prog.outliers,
                            prog.in_features), x)
    with pytest.raises(native.StreamError, match=r"x of shape \[M, 64\]"):
        fast.run(prog, np.ones((2, 63), np.float32))


@needs_avx2
def test_a_cached_plan_is_revalidated_once_the_stream_is_writable(fast):
    attrs, ops = random_qlinear(np.random.default_rng(10), "rtn-int2", 16, 32, 16)
    prog = generate(decompose(attrs, ops))
    words = prog.stream.copy()
    words.setflags(write=False)
    ro = type(prog)(words, prog.weights, prog.params, prog.outliers, prog.in_features)
    x = np.ones((1, 32), np.float32)
    fast.run(ro, x)                     # validated and cached
    words.setflags(write=True)
    words[5] = np.uint64(0xEE)          # now an unknown opcode
    with pytest.raises(native.StreamError, match="unknown opcode"):
        fast.run(ro, x)


def test_a_library_of_another_abi_is_refused():
    if not native.cpu_has_avx2():
        pytest.skip("no AVX2")
    src = native.source_text().replace(b"int lut_abi_version(void) { return 2; }",
                                       b"int lut_abi_version(void) { return 1; }")
    with pytest.raises(native.NativeBuildError, match="ABI 1"):
        native.NativeExecutor(native.build_library(src))


def _altered(prog, op, field, delta):
    """A copy of the program with one ``op`` instruction's field changed by ``delta``."""
    words = prog.stream.copy()
    fmt = isa.FORMATS[op]
    pos = np.flatnonzero((words[isa.HEADER_WORDS:] & np.uint64(0xFF)) == fmt.opcode)[0] + isa.HEADER_WORDS
    ins = isa.decode(words[pos:pos + 1])[0]
    args = dict(ins.args)
    args[field] += delta
    words[pos] = isa.encode([isa.Instruction.make(op, **args)])[0]
    return type(prog)(words, prog.weights, prog.params, prog.outliers, prog.in_features)


@needs_avx2
@pytest.mark.parametrize("bits,top_plane", [(4, 12), (2, 14)])   # quad units: plane <= 12; pair: <= 14
def test_top_planes_and_full_blocks_agree_with_the_reference(fast, bits, top_plane):
    """The largest integer sums the validator admits: every code at its maximum, positive
    activations (table entry 15 quantizes to 127), 256-activation blocks (64 quad words or 32
    pair words per LUTACC) and every LUTACC moved to the highest plane the validator accepts."""
    from bitsmith.ir.code_packing import pack_codes
    k = 256
    attrs = dict(scheme=f"rtn-int{bits}", group_size=k, in_features=k, out_features=16, sparsity="",
                 outliers=False, bias=False)
    ops = [pack_codes(np.full((16, k), (1 << bits) - 1), bits), np.full((16, 1), 0.5, np.float16),
           np.zeros((16, 1), np.uint8)]
    prog = generate(decompose(attrs, ops), k)
    words = prog.stream.copy()
    lpos = np.flatnonzero((words[isa.HEADER_WORDS:] & np.uint64(0xFF)) == isa.FORMATS["LUTACC"].opcode)
    for pos in lpos + isa.HEADER_WORDS:
        args = dict(isa.decode(words[pos:pos + 1])[0].args)
        args["plane"] = top_plane
        words[pos] = isa.encode([isa.Instruction.make("LUTACC", **args)])[0]
    top = type(prog)(words, prog.weights, prog.params, prog.outliers, prog.in_features)
    x = np.random.default_rng(12).uniform(0.5, 2.0, size=(3, k)).astype(np.float32)
    for int8 in (True, False):
        got = fast.run(top, x, int8)
        assert np.isfinite(got).all() and np.abs(got).max() > 2.0 ** top_plane
        assert np.array_equal(got, reference_executor.run(top, x, int8))


def _edit_table_rules(words, kind):
    """Breaks one of the stream rules about TABLE blocks (the parallel table build relies on them)."""
    ops = words[isa.HEADER_WORDS:] & np.uint64(0xFF)
    tpos = np.flatnonzero(ops == isa.FORMATS["TABLE"].opcode) + isa.HEADER_WORDS
    first, second = (dict(isa.decode(words[p:p + 1])[0].args) for p in tpos[:2])
    if kind == "overlap":
        second["kg0"] = first["kg0"]
        words[tpos[1]] = isa.encode([isa.Instruction.make("TABLE", **second)])[0]
    elif kind == "same block":
        second["block"] = first["block"]
        words[tpos[1]] = isa.encode([isa.Instruction.make("TABLE", **second)])[0]
    else:  # a LUTACC on a block that no TABLE builds
        words[3] += np.uint64(1)
        lpos = np.flatnonzero(ops == isa.FORMATS["LUTACC"].opcode)[0] + isa.HEADER_WORDS
        args = dict(isa.decode(words[lpos:lpos + 1])[0].args)
        args["block"] = int(words[3]) - 1
        words[lpos] = isa.encode([isa.Instruction.make("LUTACC", **args)])[0]


@needs_avx2
@pytest.mark.parametrize("kind,message", [("overlap", "TABLE out of range"), ("same block", "TABLE out of range"),
                                          ("unbuilt block", "LUTACC field out of range")])
def test_table_blocks_must_be_distinct_disjoint_and_built(fast, kind, message):
    attrs, ops = random_qlinear(np.random.default_rng(11), "rtn-int4", 16, 64, 16)
    prog = generate(decompose(attrs, ops), 16)
    words = prog.stream.copy()
    _edit_table_rules(words, kind)
    with pytest.raises(native.StreamError, match=message):
        fast.run(type(prog)(words, prog.weights, prog.params, prog.outliers, prog.in_features),
                 np.ones((1, 64), np.float32))


@needs_avx2
@pytest.mark.parametrize("op,field,delta", [("LUTACC", "plane", 1), ("LUTACC", "kg0", 1), ("SCALE", "pidx", 1),
                                            ("SCALE", "block0", 1), ("LUTACC", "block", 1), ("TILE", "wptr", 1), ("STORE", "nrows", -1),
                                            ("OUTLIER", "start", 1), ("TABLE", "nkg", -1)])
def test_altering_one_instruction_changes_the_output(fast, op, field, delta):
    """The fast executor reads only the stream and its operands: any field is live."""
    attrs, ops = random_qlinear(np.random.default_rng(5), "rtn-int4", 40, 64, 16, True)
    prog = generate(decompose(attrs, ops))
    x = np.random.default_rng(6).normal(size=(2, 64)).astype(np.float32)
    base = fast.run(prog, x)
    bad = _altered(prog, op, field, delta)
    changed = fast.run(bad, x)
    assert not np.array_equal(base, changed)
    assert np.array_equal(changed, reference_executor.run(bad, x))  # the same (altered) meaning in both


@needs_avx2
def test_two_stores_of_one_row_are_refused(fast):
    """Tiles run in parallel: a row stored by two tiles would be a race, so both validators refuse it."""
    attrs, ops = random_qlinear(np.random.default_rng(5), "rtn-int4", 40, 64, 16)
    bad = _altered(generate(decompose(attrs, ops)), "STORE", "row0", 1)   # rows 1..16 overlap tile 2's 16..31
    x = np.ones((1, 64), np.float32)
    for run in (fast.run, reference_executor.run):
        with pytest.raises(native.StreamError, match="STORE out of range at word"):
            run(bad, x)


@needs_avx2
@pytest.mark.parametrize("edit,error,message", [
    (lambda w: w.__setitem__(5, np.uint64(0xEE)), native.StreamError, "unknown opcode"),
    (lambda w: w.__setitem__(-1, np.uint64(isa.FORMATS["SYNC"].opcode)), native.StreamError, "out of order"),
    (lambda w: w.__setitem__(0, np.uint64(1)), isa.ISAError, "bad magic"),
])
def test_fast_executor_refuses_malformed_streams(fast, edit, error, message):
    attrs, ops = random_qlinear(np.random.default_rng(7), "rtn-int2", 16, 32, 16)
    prog = generate(decompose(attrs, ops))
    words = prog.stream.copy()
    edit(words)
    with pytest.raises(error, match=message):
        fast.run(type(prog)(words, prog.weights, prog.params, prog.outliers, prog.in_features),
                 np.ones((1, 32), np.float32))


@needs_avx2
def test_fast_executor_refuses_weight_reads_past_the_operand(fast):
    attrs, ops = random_qlinear(np.random.default_rng(8), "rtn-int4", 16, 32, 16)
    prog = generate(decompose(attrs, ops))
    short = type(prog)(prog.stream, prog.weights[:-32], prog.params, prog.outliers, prog.in_features)
    with pytest.raises(native.StreamError, match="weight words out of range"):
        fast.run(short, np.ones((1, 32), np.float32))


def test_plane_units_cover_every_plane_once():
    for planes in range(1, 9):
        covered = []
        for mode, p in plane_units(planes):
            covered += list(range(p, p + (4 if mode == isa.MODE_QUAD else 2)))
        assert set(range(planes)) <= set(covered) and len(covered) == len(set(covered))
        assert len(covered) - planes <= 1  # at most one all-zero plane is stored


def test_unsupported_formats_are_refused_by_name():
    attrs, ops = random_qlinear(np.random.default_rng(9), "rtn-int4", 8, 12, 6)
    with pytest.raises(UnsupportedOpError, match="group_size 6 is not a multiple of 4.*|lut-cpu"):
        decompose(attrs, ops, "model.fc")
    attrs = dict(attrs, sparsity="2:4", group_size=4)
    with pytest.raises(UnsupportedOpError, match="N:M sparsity.*"):
        decompose(attrs, ops, "model.fc")
