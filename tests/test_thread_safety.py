"""A CompiledModel may be called from several threads at once (a server's workers): on every
CPU target, 8 threads running a mix of forward calls, KV-cache decode steps and generate
calls get results bit-identical to the same calls made one after another."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import pytest

import bitsmith
from bitsmith.runtime.generate import empty_cache, positions

from bitsmith.testing.hf_configs import VOCAB, make_model

QUANT = {"quant": "bitmod-w4", "group_size": 32}
# case -> (target, options); the quantized reference cases share the interpreter's process-wide
# decoded-weight cache (ir/quantized.py DECODE_CACHE) between threads
TARGETS = {"reference": ("reference", {}), "reference-bitmod-w4": ("reference", QUANT),
           "tvm-llvm": ("tvm-llvm", {}), "lut-cpu": ("lut-cpu", QUANT),
           "lut-cpu-reference-host": ("lut-cpu", {**QUANT, "lut_host": "reference"})}
THREADS = 8


@pytest.fixture(autouse=True)
def _private_kernel_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))


def _ids(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    return rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)


def _forward(cm: Any, ids: np.ndarray) -> Callable[[], list[np.ndarray]]:
    return lambda: [np.asarray(cm(ids))]


def _decode(cm: Any, ids: np.ndarray, steps: int) -> Callable[[], list[np.ndarray]]:
    """Prefill ``ids`` through cm.run, then ``steps`` one-token steps on the returned KV cache."""
    def job() -> list[np.ndarray]:
        b, s = ids.shape
        logits, *cache = cm.run("main", [ids, positions(b, 0, s), *empty_cache(cm.module, b)])
        outs = [logits]
        token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        for i in range(steps):
            logits, *cache = cm.run("main", [token, positions(b, s + i, 1), *cache])
            outs.append(logits)
            token = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        return outs + cache
    return job


def _generate(cm: Any, ids: np.ndarray, n: int) -> Callable[[], list[np.ndarray]]:
    return lambda: [np.asarray(cm.generate(ids, max_new_tokens=n))]


def _jobs(cm: Any) -> list[Callable[[], list[np.ndarray]]]:
    """Mixed batch sizes and prompt lengths; several jobs share shapes (shared buffers would collide)."""
    rng = np.random.default_rng(7)
    jobs = []
    for batch, seq in [(1, 1), (1, 5), (2, 7), (3, 16), (1, 5), (2, 1)]:
        jobs.append(_forward(cm, _ids(rng, batch, seq)))
    for batch, seq, steps in [(1, 4, 6), (2, 3, 5), (1, 9, 4), (3, 2, 6)]:
        jobs.append(_decode(cm, _ids(rng, batch, seq), steps))
    for batch, seq, n in [(1, 3, 8), (2, 6, 5)]:
        jobs.append(_generate(cm, _ids(rng, batch, seq), n))
    return jobs


@pytest.fixture(scope="module", params=list(TARGETS))
def compiled(request) -> Any:
    target, options = TARGETS[request.param]
    return bitsmith.compile(make_model("llama"), target=target, **options)


def test_concurrent_calls_equal_serial_calls(compiled, monkeypatch):
    from bitsmith.ir.quantized import DECODE_CACHE
    jobs = _jobs(compiled)
    expected = [job() for job in jobs]
    # start the concurrent part with an empty decoded-weight cache that holds about one layer, so
    # threads decode, insert and evict at the same time
    DECODE_CACHE.clear()
    monkeypatch.setattr(DECODE_CACHE, "max_bytes", 64 * 64 * 4)
    order = [i for i in range(len(jobs)) for _ in range(8)]  # every job 8 times, interleaved
    random.Random(0).shuffle(order)
    start = threading.Barrier(THREADS)

    def worker(chunk: list[int]) -> list[tuple[int, list[np.ndarray]]]:
        start.wait()  # all threads begin together, so their calls overlap
        return [(i, jobs[i]()) for i in chunk]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [r for f in [pool.submit(worker, order[t::THREADS]) for t in range(THREADS)] for r in f.result()]
    assert len(results) == len(order)
    for i, got in results:
        want = expected[i]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes(), \
                f"{compiled.target}: job {i} differs when run concurrently"


def test_decoded_weight_cache_under_contention(monkeypatch):
    """The interpreter's process-wide decoded-weight cache, hammered by 8 threads with a budget
    of a few entries (constant inserts and evictions): no exception, every value returned is
    the one for its key, and the byte count equals what the cache holds."""
    import sys

    from bitsmith.ir import quantized
    monkeypatch.setattr(quantized, "dequantize", lambda attrs, ops: np.full(64, float(ops[0][0]), np.float32))
    cache = quantized._DecodeCache(max_bytes=4 * 64 * 4)
    layers = []
    for i in range(16):
        a = np.array([i], np.int64)
        a.flags.writeable = False
        layers.append(a)
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> int:
        rng = random.Random(seed)
        start.wait()
        bad = 0
        for _ in range(3000):
            i = rng.randrange(len(layers))
            bad += int(cache.get({"k": 1}, [layers[i]])[0] != i)
        return bad

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            bad = sum(pool.map(worker, range(THREADS)))
    finally:
        sys.setswitchinterval(old)
    assert bad == 0
    assert cache.bytes == sum(w.nbytes for _, w in cache.entries.values()) <= cache.max_bytes
