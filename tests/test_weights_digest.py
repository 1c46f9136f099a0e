"""``write_weights`` with a digest cache: the sha256 it returns is always the written file's
(the oracle: hashlib over the file's bytes), whether the digest was computed or looked up."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings, strategies as st

from bitsmith.ir import TensorTable
from bitsmith.runtime.weights_writer import write_weights


def _file_digest(path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 4), flip=st.integers(0, 3))
def test_cached_digest_is_the_files(tmp_path_factory, seed, n, flip):
    d = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(seed)
    arrays = {f"t{i}": rng.standard_normal((3, i + 1)).astype(np.float32) for i in range(n)}
    arrays["ids"] = np.arange(5, dtype=np.int64)
    cache = d / "digests"
    first = write_weights(d / "a.safetensors", TensorTable(arrays), cache)
    assert first == _file_digest(d / "a.safetensors") and len(list(cache.iterdir())) == 1
    again = write_weights(d / "b.safetensors", TensorTable(arrays), cache)  # looked up
    assert again == first == _file_digest(d / "b.safetensors")
    changed = dict(arrays)
    name = f"t{flip % n}"
    changed[name] = changed[name].copy()
    changed[name].flat[0] += 1.0  # one value of one tensor: another file, another key
    other = write_weights(d / "c.safetensors", TensorTable(changed), cache)
    assert other == _file_digest(d / "c.safetensors") and other["sha256"] != first["sha256"]
    renamed = {("r" + k): v for k, v in arrays.items()}  # same bytes, other header
    assert write_weights(d / "e.safetensors", TensorTable(renamed), cache) == _file_digest(d / "e.safetensors")


def test_unreadable_entry_is_recomputed(tmp_path):
    arrays = {"w": np.ones((2, 2), np.float32)}
    cache = tmp_path / "digests"
    first = write_weights(tmp_path / "a.safetensors", TensorTable(arrays), cache)
    (entry,) = cache.iterdir()
    entry.write_text("not a digest")
    assert write_weights(tmp_path / "b.safetensors", TensorTable(arrays), cache) == first
    assert entry.read_text().strip() == first["sha256"]  # rewritten
