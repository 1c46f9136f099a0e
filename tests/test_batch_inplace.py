"""DecodeBatch on in-place KV caches (runtime/batch_caches.py): rows of different lengths that
join and leave give, bit for bit, the logits of the concat path (``main`` returning
``concat(past, new)`` every step, the oracle: tests/test_ragged_batch.py shows it equals each
row decoded alone), on tvm-llvm and lut-cpu, native driver and Python executor; the layout
bookkeeping (shifts on admit, trims on release, geometric growth within the caps) keeps the
buffers equal to the concat path's caches whatever the order of admits, steps and releases; and
targets without the in-place variant fall back to the concat path and say so."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith.runtime import batch_caches
from bitsmith.runtime.batch_caches import CONCAT, INPLACE, ConcatRows, InplaceRows
from bitsmith.runtime.batching import DecodeBatch
from bitsmith.testing.hf_configs import VOCAB, make_model

from test_native_step import compile_case, stepper  # the same tiny models, compiled once per process

HEADS, DIM = 2, 3


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


# ---------------------------------------------------------------- layout, on a numpy stand-in model

def _new_keys(ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    """A step's keys [rows, HEADS, 1, DIM]: distinct per row, position, head and dim (exact in float32)."""
    base = ids[:, 0] * 1000.0 + position_ids[:, 0] * 10.0
    return (base[:, None, None, None] + np.arange(HEADS * DIM).reshape(1, HEADS, 1, DIM) / 8).astype(np.float32)


def _visible(caches, mask: np.ndarray) -> np.ndarray:
    """What attention reads: every cache column under the mask, as [rows, 1, n] 'logits'."""
    return np.concatenate([(c * mask[:, None, :, None]).reshape(len(mask), 1, -1) for c in caches], axis=2)


class FakeConcatModel:
    """``main`` of the kv-cache pass, with _new_keys as its keys and _visible as its logits."""

    module = SimpleNamespace(function=lambda name: SimpleNamespace(params=[
        SimpleNamespace(name=n) for n in ("input_ids", "position_ids", "past_key_0", "past_value_0", "attention_mask")]))

    def run(self, function, args):
        ids, pos, *past, mask = args
        present = [np.concatenate([p, _new_keys(ids, pos) + k], axis=2) for k, p in enumerate(past)]
        return [_visible(present, mask), *present]


class FakeSession:
    """A CacheSession: writes _new_keys at column t - 1 of the first rows, counts its allocations."""

    def __init__(self):
        self.caches, self.starts = [], []

    def start(self, batch, capacity):
        self.starts.append((batch, capacity))
        self.caches = [np.zeros((batch, HEADS, capacity, DIM), np.float32) for _ in range(2)]  # as KVSession

    def step(self, ids, position_ids, attention_mask):
        b, t = attention_mask.shape
        assert b <= self.caches[0].shape[0] and t <= self.caches[0].shape[2]
        for k, c in enumerate(self.caches):
            c[:b, :, t - 1:t] = _new_keys(ids, position_ids) + k
        return _visible([c[:b, :, :t] for c in self.caches], attention_mask)


OPS = st.lists(st.one_of(st.tuples(st.just("admit"), st.integers(1, 30)), st.just(("step",)),
                         st.just(("step",)), st.tuples(st.just("release"), st.integers(0, 7))), max_size=40)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # the patch is the same for every input
@given(ops=OPS, max_rows=st.sampled_from([None, 3]), max_positions=st.sampled_from([None, 40]))
def test_inplace_layout_equals_concat_caches(monkeypatch, ops, max_rows, max_positions):
    """Any admit/step/release order: the in-place buffers' live region equals the concat path's
    caches, byte for byte, and every step reads the same keys under the same mask."""
    monkeypatch.setattr(batch_caches, "round_capacity", lambda n: n)  # grow on every overflow: most copies
    rng = np.random.default_rng(0)
    session = FakeSession()
    inplace, concat = InplaceRows(session, max_rows, max_positions), ConcatRows(FakeConcatModel())
    lengths: list[int] = []
    for op in ops:
        if op[0] == "admit" and (max_rows is None or len(lengths) < max_rows):
            n = min(op[1], max_positions or op[1])
            prefill = [rng.standard_normal((1, HEADS, n, DIM)).astype(np.float32) for _ in range(2)]
            inplace.add(prefill)
            concat.add(prefill)
            lengths.append(n)
        elif op[0] == "step" and lengths and (max_positions is None or max(lengths) < max_positions):
            width = max(lengths)
            ids = np.arange(len(lengths))[:, None] + 1
            pos = np.array(lengths)[:, None]
            mask = (np.arange(width + 1)[None] >= width - pos).astype(np.int64)
            assert inplace.step(ids, pos, mask).tobytes() == concat.step(ids, pos, mask).tobytes()
            lengths = [n + 1 for n in lengths]
        elif op[0] == "release" and lengths:
            r = op[1] % len(lengths)
            lengths.pop(r)
            inplace.remove(r, max(lengths, default=0))
            concat.remove(r, max(lengths, default=0))
        assert inplace.rows == concat.rows == len(lengths)
        assert inplace.width == concat.width == max(lengths, default=0)
        for a, b in zip(session.caches, concat.caches):
            assert a[:inplace.rows, :, :inplace.width].tobytes() == b.tobytes()
        if max_rows is not None:
            assert inplace.row_capacity <= max_rows
        if max_positions is not None:
            assert inplace.capacity <= max_positions + 1  # + 1: a row of max_positions still reserves its next column
    if not lengths:
        assert session.caches == []  # an empty batch holds no buffers


def test_buffers_grow_geometrically_not_per_token():
    session = FakeSession()
    rows = InplaceRows(session)
    rows.add([np.zeros((1, HEADS, 5, DIM), np.float32)] * 2)
    for k in range(500):
        mask = np.ones((1, rows.width + 1), np.int64)
        rows.step(np.ones((1, 1), np.int64), np.array([[rows.width]]), mask)
    # capacity 64 (CAPACITY_STEP), 128, 256, 512: one allocation per doubling, not one per token
    assert session.starts == [(1, 64), (1, 128), (1, 256), (1, 512)]
    for _ in range(3):
        rows.add([np.zeros((1, HEADS, 3, DIM), np.float32)] * 2)
    assert session.starts[4:] == [(2, 512), (4, 512)]  # rows doubled too: the 4th row fits


def test_bad_layout_calls_are_refused():
    rows = InplaceRows(FakeSession())
    rows.add([np.zeros((1, HEADS, 4, DIM), np.float32)] * 2)
    with pytest.raises(ValueError, match="mask"):
        rows.step(np.ones((1, 1), np.int64), np.array([[4]]), np.ones((1, 4), np.int64))
    with pytest.raises(ValueError, match="row 1 of 1"):
        rows.remove(1, 0)


# ---------------------------------------------------------------- the real kernels

PROMPTS = {k: [int(x) for x in np.random.default_rng(3).integers(1, VOCAB, n)] for k, n in
           zip("abcdef", (5, 13, 2, 21, 8, 3))}


def _scenario(cm, monkeypatch, inplace: bool) -> tuple[str, dict[str, list[np.ndarray]]]:
    """Ragged admits and releases: a longer row joins (the others move right), the longest leaves
    (every row moves left), a middle row leaves, the rows outgrow their buffers (growth on
    every overflow: ``round_capacity`` stubbed to the identity); every logits vector of every row."""
    monkeypatch.setattr(cm, "kv_inplace", inplace)
    monkeypatch.setattr(batch_caches, "round_capacity", lambda n: n)
    db = DecodeBatch(cm)
    got: dict[str, list[np.ndarray]] = {}

    def admit(k):
        got[k] = [db.admit(k, PROMPTS[k])]
        assert got[k][0].flags.owndata  # a copy, not a view pinning the run's output arena

    def step(n=1):
        for _ in range(n):
            for k, logits in db.step({k: int(np.argmax(got[k][-1])) for k in db.keys()}).items():
                assert logits.flags.owndata
                got[k].append(logits)

    admit("a")
    admit("c")
    step(2)
    admit("b")          # longer than every row: a and c move right
    step()
    admit("d")          # longer again
    admit("e")
    step(3)
    db.release("d")     # the longest leaves: every row moves left
    step()
    db.release("c")     # a middle row leaves: the rows after it move up
    admit("f")
    step(4)
    db.release("a")
    db.release("b")
    db.release("e")
    step()
    db.release("f")
    return db.kv_cache, got


@pytest.mark.parametrize("python", [False, True], ids=["native", "python-executor"])
@pytest.mark.parametrize("name", ["tvm-llvm", "lut-cpu"])
def test_decode_batch_in_place_equals_concat_bit_for_bit(name, python, monkeypatch):
    cm = compile_case(name)
    monkeypatch.setattr(stepper(cm), "python_steps", python)
    path, got = _scenario(cm, monkeypatch, True)
    want_path, want = _scenario(cm, monkeypatch, False)
    assert (path, want_path) == (INPLACE, CONCAT)
    assert got.keys() == want.keys()
    for k in got:
        assert len(got[k]) == len(want[k]) > 1
        for i, (g, w) in enumerate(zip(got[k], want[k])):
            assert g.dtype == w.dtype == np.float32 and g.tobytes() == w.tobytes(), \
                f"{name} row {k} step {i}: max diff {np.abs(g - w).max()}"


def test_targets_without_the_variant_fall_back_to_concat(monkeypatch):
    ref = bitsmith.compile(make_model("llama"), target="reference")
    assert ref.executable.kv_session() is None and DecodeBatch(ref).kv_cache == CONCAT
    cm = compile_case("tvm-llvm")
    assert DecodeBatch(cm).kv_cache == INPLACE
    monkeypatch.setattr(cm.executable, "kv_session", lambda: None)  # an artifact from before the variant
    assert DecodeBatch(cm).kv_cache == CONCAT


def test_session_steps_the_first_rows_and_leaves_spare_rows_alone():
    """KVSession.step with fewer rows than its caches: the same logits as caches of exactly those
    rows, the spare row untouched; more rows than the caches hold is refused."""
    cm = compile_case("tvm-llvm")
    ids = np.array([[3, 17, 5], [8, 4, 21]], np.int64)
    pos, mask = np.tile(np.arange(3), (2, 1)), np.ones((2, 3), np.int64)
    exact, spare = cm.executable.kv_session(), cm.executable.kv_session()
    exact.start(2, 8)
    spare.start(3, 8)
    for c in spare.caches:
        c[2] = 7.0
    assert exact.step(ids, pos, mask).tobytes() == spare.step(ids, pos, mask).tobytes()
    for a, b in zip(exact.caches, spare.caches):
        assert a.tobytes() == b[:2].tobytes() and np.all(b[2] == 7.0)
    with pytest.raises(ValueError, match="caches for 3 rows"):
        spare.step(np.ones((4, 1), np.int64), np.ones((4, 1), np.int64), np.ones((4, 4), np.int64))
