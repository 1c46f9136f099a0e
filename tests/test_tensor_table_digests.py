"""TensorTable digests: derived tables (subset, with_tensors) reuse the digests of the arrays
they share and hash only new ones, with the same infos as hashing everything afresh."""

from __future__ import annotations

import hashlib

import numpy as np

from bitsmith.ir import TensorTable
from bitsmith.ir import graph
from bitsmith.ir.declared_tensors import DeclaredTensorTable
from bitsmith.ir.graph import TensorInfo

RNG = np.random.default_rng(0)
ARRAYS = {"a": RNG.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
          "c": np.array(2.5, np.float32)}


def counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = graph.sha256_of

    def sha(array):
        calls.append(1)
        return real(array)
    monkeypatch.setattr(graph, "sha256_of", sha)
    return calls


def test_derived_tables_hash_only_new_arrays_and_match_a_fresh_table(monkeypatch):
    table = TensorTable(ARRAYS)
    calls = counting(monkeypatch)
    sub = table.subset(["a", "c"])
    new = np.full((2, 2), 7, np.float32)
    grown = sub.with_tensors({"d": new, "a": ARRAYS["a"] + 1})  # "a" replaced: hashed again
    assert len(calls) == 2
    for t in (sub, grown):  # oracle: hashlib over each array's bytes
        for name in t:
            arr = t[name]
            assert t.info(name) == TensorInfo(name, arr.shape, t.info(name).dtype, hashlib.sha256(arr.tobytes()).hexdigest())
    assert grown == TensorTable({"a": ARRAYS["a"] + 1, "c": ARRAYS["c"], "d": new})


def test_declared_tables_reuse_digests_too(monkeypatch):
    declared = TensorTable({"x": np.ones(3, np.float32)}).info("x")
    table = DeclaredTensorTable({"a": ARRAYS["a"]}, [declared])
    calls = counting(monkeypatch)
    sub = table.subset(["a", "x"])
    assert not calls and sub.info("a") == table.info("a") and sub.info("x") == declared
