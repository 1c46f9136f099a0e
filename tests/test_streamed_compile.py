"""Streamed compiles (weights read on demand, never all in memory) give what the in-memory path gives.

Oracle: the same seeded Llama compiled from a transformers model holding every weight
(``SeededLlama.hf_model``); the streamed capture must give an equal tensor table (names, types,
sha256), the same logits bit for bit, and the same weights.safetensors bytes. The streaming
writer is checked against ``safetensors.numpy.save_file`` byte for byte, and row-chunked
quantization against quantizing the matrix whole (rows are independent: exact equality).
"""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith.ir import TensorTable, TensorType
from bitsmith.ir.provided_tensors import ProvidedTensorMismatchError, ProvidedTensorTable
from bitsmith.ir.quant_grids import get_scheme
from bitsmith.passes.quantization import groups
from bitsmith.runtime.weights_writer import write_weights
from bitsmith.testing.llama_shape import LlamaShape
from bitsmith.testing.seeded_llama import SeededLlama

TINY = SeededLlama(LlamaShape(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=1, vocab=256,
                              max_positions=64), seed=7)


class CountingSource:
    """The seeded weights, recording each read."""

    def __init__(self, model: SeededLlama) -> None:
        self.model, self.reads = model, []

    def __call__(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.model.tensor(name)


@pytest.fixture(scope="module")
def compiled_pair(tmp_path_factory):
    pytest.importorskip("tvm")
    from bitsmith.frontend.streamed_capture import capture_streamed
    source = CountingSource(TINY)
    whole = bitsmith.compile(TINY.hf_model(), target="tvm-llvm", quant="bitmod-w4")
    streamed = bitsmith.compile(capture_streamed(TINY.hf_config(), source), target="tvm-llvm", quant="bitmod-w4")
    reads_during_compile = list(source.reads)
    root = tmp_path_factory.mktemp("streamed")
    whole.save(str(root / "whole"))
    streamed.save(str(root / "streamed"))
    return whole, streamed, reads_during_compile, root


def test_streamed_table_equals_the_in_memory_one(compiled_pair):
    whole, streamed, _, _ = compiled_pair
    assert isinstance(streamed.module.tensors, ProvidedTensorTable)
    assert streamed.module.tensors.infos() == whole.module.tensors.infos()


def test_streamed_compile_reads_each_weight_once_and_holds_no_quantized_fp32(compiled_pair):
    _, streamed, reads, _ = compiled_pair
    params = set(TINY.parameter_shapes())
    # each parameter read at most once while compiling (the quantized ones exactly once); weights
    # a compile only carries over (embedding, norms) may be read later, when executors or the
    # artifact need them
    assert len(reads) == len(set(reads)) and set(reads) <= params
    quantized = {n for n in params if n.endswith("proj.weight")}
    assert quantized <= set(reads)
    table = streamed.module.tensors
    # packed operands are held; what is left of the fp32 parameters (norms, embedding, lm_head) is not
    assert not any(n in params for n in table if not table.is_provided(n))


def test_streamed_logits_and_artifact_bytes_equal(compiled_pair):
    whole, streamed, _, root = compiled_pair
    ids = np.array([[1, 5, 7, 200, 3]])
    np.testing.assert_array_equal(np.asarray(streamed(ids)), np.asarray(whole(ids)))
    assert (root / "streamed" / "weights.safetensors").read_bytes() == (root / "whole" / "weights.safetensors").read_bytes()
    loaded = bitsmith.load(str(root / "streamed"))
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(whole(ids)))


def test_provided_entry_reads_source_without_hashing_for_types():
    calls = []
    table = ProvidedTensorTable({"held": np.ones(3, np.float32)}, {"w": TensorType((2, 3), "float32")},
                                lambda n: calls.append(n) or np.arange(6, dtype=np.float32).reshape(2, 3))
    assert table.tensor_type("w") == TensorType((2, 3), "float32") and calls == []
    assert "w" in table and calls == []
    assert table.info("w") == TensorTable({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}).info("w")
    derived = table.with_tensors({"new": np.zeros(2, np.int8)}).subset({"w", "new"})
    assert sorted(derived) == ["new", "w"] and derived.is_provided("w")
    table.info("w")
    assert calls == ["w"]  # the hash is computed once


def test_provided_entry_of_the_wrong_shape_is_refused():
    table = ProvidedTensorTable(None, {"w": TensorType((2, 3), "float32")}, lambda n: np.zeros((3, 2), np.float32))
    with pytest.raises(ProvidedTensorMismatchError, match="'w'"):
        table["w"]


DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text("abcxyz._", min_size=1, max_size=6),
                       st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)), max_size=6))
def test_streaming_writer_bytes_equal_safetensors(tmp_path_factory, spec):
    # safetensors' own writer fails on a 0-d bool array (numpy.bool has no .ctypes): not compared
    spec = {n: (d, shape) for n, (d, shape) in spec.items() if shape or d != "bool"}
    rng = np.random.default_rng(0)
    arrays = {n: (rng.integers(0, 100, shape) % 2 if d == "bool" else rng.integers(-50, 50, shape)).astype(d)
              for n, (d, shape) in spec.items()}
    d = tmp_path_factory.mktemp("w")
    safetensors.numpy.save_file(arrays, str(d / "lib.safetensors"))
    entry = write_weights(d / "ours.safetensors", TensorTable(arrays))
    ours = (d / "ours.safetensors").read_bytes()
    assert ours == (d / "lib.safetensors").read_bytes()
    assert entry["size"] == len(ours)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), scheme=st.sampled_from(["bitmod-w4", "rtn-int4", "fp3"]),
       chunk=st.integers(1, 2000), seed=st.integers(0, 2**16))
def test_row_chunked_quantization_equals_whole(rows, cols, scheme, chunk, seed):
    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(groups, "ROW_CHUNK_ELEMENTS", 1 << 40)
        whole = groups.quantize_matrix(w, get_scheme(scheme), 64)
        mp.setattr(groups, "ROW_CHUNK_ELEMENTS", chunk)
        chunked = groups.quantize_matrix(w, get_scheme(scheme), 64)
    for field in groups._FIELDS:
        a, b = getattr(whole, field), getattr(chunked, field)
        assert (a is None and b is None) or np.array_equal(a, b), field


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 30), cols=st.integers(1, 200), scheme=st.sampled_from(["bitmod-w4", "rtn-int4", "rtn-int8"]),
       sparsity=st.sampled_from(["", "2:4"]), chunk=st.integers(1, 500), seed=st.integers(0, 2**16))
def test_row_blocked_dequantize_equals_whole(rows, cols, scheme, sparsity, chunk, seed):
    from bitsmith.ir import quantized
    from bitsmith.passes.quantize import pack_weight, qlinear_attrs
    if sparsity:
        cols = -(-cols // 4) * 4
    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    attrs = qlinear_attrs(w.shape, get_scheme(scheme), 64, sparsity, 0.0, False)
    ops = pack_weight(w, get_scheme(scheme), attrs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantized, "DECODE_ROW_ELEMENTS", 1 << 40)
        whole = quantized.dequantize(attrs, ops)
        mp.setattr(quantized, "DECODE_ROW_ELEMENTS", chunk)
        np.testing.assert_array_equal(quantized.dequantize(attrs, ops), whole)
