"""Tied tables quantized once and shared (issue 15, part 4): the ``qembedding`` op, the weight
passes that make it, the ``dequantize`` fallback and tvm-llvm's 8-bit gather kernel.

Oracle: the scalar reference decoder of the test suite (``quant_reference.ref_dequantize``;
the IR's ``dequantize`` for schemes it does not cover) applied to the whole table, then rows
picked with numpy. Every comparison is bit for bit: a gathered row is the decoded weight
itself (no arithmetic beyond the decoder's own), and the dense stand-in computes the same
float32 matmul as the quantized module.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bitsmith.ir import GraphBuilder, InterpreterError, IRTypeError, Location, TensorType, evaluate
from bitsmith.ir.quant_grids import fitted_schemes
from bitsmith.ir.quantized import dequantize
from bitsmith.ir.quantized_embedding import gathered_rows
from bitsmith.passes import Dequantize, Quantize, get_pass
from pass_checks import assert_bitwise_equal, run_passes
from quant_reference import SCHEMES as REF_SCHEMES
from quant_reference import ref_dequantize

HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEAD = "lm_head"


def tied_module(vocab: int, dim: int, seed: int, table_dtype: str = "float32", untied: bool = False):
    """ids [2, 3] -> embedding(table) -> relu -> lm_head(table.T): SmolLM2's tie in miniature."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, dim)).astype(table_dtype)
    b = GraphBuilder()
    ids = b.param("ids", TensorType((2, 3), "int64"))
    emb = b.constant("model.embed_tokens.weight", table, Location("model.embed_tokens"))
    head = b.constant("lm_head.weight", rng.standard_normal((vocab, dim)).astype(table_dtype),
                      Location(HEAD)) if untied else emb
    h = b.op("relu", [b.op("embedding", [emb, ids], loc=Location("model.embed_tokens"))])
    return b.module([b.op("linear", [h, head], loc=Location(HEAD))]), table


def ops_of(module) -> list[str]:
    return [n.op for f in module.functions for n in f.nodes]


def decoded(attrs: dict, operands: list[np.ndarray]) -> np.ndarray:
    ref = ref_dequantize if attrs["scheme"] in REF_SCHEMES else dequantize
    return np.asarray(ref(attrs, operands), dtype=np.float32)


def ids_for(vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, vocab, (2, 3)).astype(np.int64)


@HYP
@given(scheme=st.sampled_from(sorted(fitted_schemes())), group_size=st.sampled_from([4, 8, 32, 128]),
       vocab=st.integers(2, 40), dim=st.sampled_from([8, 24, 40]), seed=st.integers(0, 2 ** 16))
def test_tied_table_is_gathered_from_the_heads_codes(scheme, group_size, vocab, dim, seed):
    """quantize on the head leaves one packed copy: the gather reads it, the float table is gone,
    and the model computes exactly what a float model on the decoded weight computes."""
    module, _ = tied_module(vocab, dim, seed)
    after = run_passes(module, Quantize(scheme=scheme, group_size=group_size, layers=(HEAD,)))
    assert "embedding" not in ops_of(after) and ops_of(after).count("qembedding") == 1
    assert "model.embed_tokens.weight" not in after.tensors
    fn = after.functions[0]
    producers = fn.producers()
    (gather,) = [n for n in fn.nodes if n.op == "qembedding"]
    (head,) = [n for n in fn.nodes if n.op == "qlinear"]
    packed = [producers[v].attr("name") for v in gather.inputs[:-1]]
    assert packed == [producers[v].attr("name") for v in head.inputs[1:]]
    weight = decoded(dict(gather.attr_dict), [after.tensors[n] for n in packed])
    ids = ids_for(vocab, seed)
    (got,) = evaluate(after, [ids])
    h = np.maximum(weight[ids], 0)
    want = (h.astype(np.float64) @ weight.T.astype(np.float64)).astype(np.float32)
    assert_bitwise_equal([got], [want])  # the interpreter's matmul: float64 sums, one rounding


@HYP
@given(scheme=st.sampled_from(sorted(fitted_schemes())), group_size=st.sampled_from([4, 8, 32]),
       vocab=st.integers(1, 30), dim=st.sampled_from([8, 24, 40]), n=st.integers(0, 12), seed=st.integers(0, 2 ** 16))
def test_gathered_rows_are_the_decoded_tables_rows(scheme, group_size, vocab, dim, n, seed):
    module, _ = tied_module(vocab, dim, seed)
    after = run_passes(module, Quantize(scheme=scheme, group_size=group_size, layers=(HEAD,)))
    fn = after.functions[0]
    (gather,) = [n for n in fn.nodes if n.op == "qembedding"]
    operands = [after.tensors[fn.producers()[v].attr("name")] for v in gather.inputs[:-1]]
    ids = np.random.default_rng(seed).integers(0, vocab, (n,))
    rows = gathered_rows(dict(gather.attr_dict), operands, ids)
    assert rows.shape == (n, dim) and rows.dtype == np.float32
    assert_bitwise_equal([rows], [decoded(dict(gather.attr_dict), operands)[ids]])


def test_untied_float16_or_sparse_tables_keep_their_embedding():
    untied, _ = tied_module(16, 8, 0, untied=True)
    after = run_passes(untied, Quantize(scheme="rtn-int4", group_size=4, layers=(HEAD,)))
    assert ops_of(after).count("embedding") == 1 and "model.embed_tokens.weight" in after.tensors
    half, _ = tied_module(16, 8, 0, table_dtype="float16")  # the gather's rows are float32: no tie
    assert ops_of(run_passes(half, Quantize(scheme="rtn-int4", group_size=4, layers=(HEAD,)))).count("embedding") == 1
    tied, _ = tied_module(16, 8, 0)
    sparse = run_passes(tied, get_pass("sparsify", pattern="2:4", layers=(HEAD,)),
                        Quantize(scheme="rtn-int4", group_size=4, layers=(HEAD,)))
    assert "qembedding" not in ops_of(sparse) and "model.embed_tokens.weight" in sparse.tensors
    unquantized, _ = tied_module(16, 8, 0)  # the head left alone: nothing is packed, nothing tied
    assert "qembedding" not in ops_of(run_passes(unquantized, Quantize(scheme="rtn-int4", group_size=4)))


@pytest.mark.parametrize("scheme", ["rtn-int8", "rtn-int4", "bitmod-w3"])
def test_dequantize_gathers_decodes_the_shared_table_once(scheme):
    """A target without the gather gets an ``embedding`` back, reading the same decoded tensor
    as the dequantized head: one float table, and the same bits as the packed module."""
    module, _ = tied_module(24, 16, 3)
    packed = run_passes(module, Quantize(scheme=scheme, group_size=8, layers=(HEAD,)))
    for passes in ([Dequantize(schemes=(scheme,), gathers=(scheme,))], [Dequantize(gathers=("*",))]):
        dense = run_passes(packed, *passes)
        assert "qembedding" not in ops_of(dense) and ops_of(dense).count("embedding") == 1
        floats = [n for n, a in dense.tensors.items() if a.dtype == np.float32]
        assert len(floats) == 1 and floats[0].endswith(".dequantized")
        ids = ids_for(24, 3)
        assert_bitwise_equal(evaluate(dense, [ids]), evaluate(packed, [ids]))
    untouched = run_passes(packed, Dequantize(gathers=("gguf-*",)))
    assert ops_of(untouched).count("qembedding") == 1


def _gather_module(attrs: dict, operands: list[np.ndarray], ids_type: TensorType):
    b = GraphBuilder()
    ids = b.param("ids", ids_type)
    consts = [b.constant(f"t.{i}", a) for i, a in enumerate(operands)]
    return b.module([b.op("qembedding", consts + [ids], attrs)])


def _rtn_int8(vocab: int, dim: int, group_size: int, seed: int) -> tuple[dict, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    groups = -(-dim // group_size)
    attrs = {"scheme": "rtn-int8", "group_size": group_size, "in_features": dim, "out_features": vocab,
             "sparsity": "", "outliers": 0.0, "bias": False}
    return attrs, [rng.integers(0, 256, (vocab, dim)).astype(np.uint8),
                   (rng.standard_normal((vocab, groups)) * 0.02).astype(np.float16),
                   rng.integers(0, 256, (vocab, groups)).astype(np.uint8)]


def test_type_rule_and_interpreter_name_the_problem():
    attrs, ops = _rtn_int8(10, 8, 4, 0)
    with pytest.raises(IRTypeError, match="operand zeros"):
        _gather_module(attrs, ops[:2] + [ops[2].astype(np.int8)], TensorType((3,), "int64"))
    with pytest.raises(IRTypeError, match="2 packed operands, scheme rtn-int8 has 3"):
        _gather_module(attrs, ops[:2], TensorType((3,), "int64"))
    with pytest.raises(IRTypeError, match="ids must be integers"):
        _gather_module(attrs, ops, TensorType((3,), "float32"))
    with pytest.raises(IRTypeError, match="sparse, outlier or biased"):
        _gather_module({**attrs, "outliers": 0.01}, ops, TensorType((3,), "int64"))
    module = _gather_module(attrs, ops, TensorType((3,), "int64"))
    with pytest.raises(InterpreterError, match=r"token id out of range \[0, 10\)"):
        evaluate(module, [np.array([0, 10, 2])])


# ------------------------------------------------------------------ tvm-llvm's gather kernel

def _q8_0(vocab: int, dim: int, seed: int) -> tuple[dict, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    attrs = {"scheme": "gguf-q8_0", "group_size": 32, "in_features": dim, "out_features": vocab,
             "sparsity": "", "outliers": 0.0, "bias": False}
    return attrs, [rng.integers(0, 256, (vocab, dim)).astype(np.uint8),
                   (rng.standard_normal((vocab, -(-dim // 32))) * 0.01).astype(np.float16)]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["rtn-int8", "gguf-q8_0"]), vocab=st.integers(1, 50), dim=st.sampled_from([16, 40, 96]),
       group_size=st.sampled_from([8, 32, 128]), n=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_tvm_gather_kernel_gives_the_reference_bits(kind, vocab, dim, group_size, n, seed, tmp_path_factory,
                                                    monkeypatch):
    pytest.importorskip("tvm")
    from bitsmith.backends.tvm.targets import get_target
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tvm-cache"))
    attrs, ops = _rtn_int8(vocab, dim, group_size, seed) if kind == "rtn-int8" else _q8_0(vocab, dim, seed)
    module = _gather_module(attrs, ops, TensorType(("n",), "int64"))
    exe = get_target("tvm-llvm").build(module, {"mcpu": "host", "threads": 0})
    ids = np.random.default_rng(seed).integers(0, vocab, (n,)).astype(np.int64)
    (got,) = exe.run("main", [ids])
    assert_bitwise_equal([got], [decoded(attrs, ops)[ids]])
    with pytest.raises(Exception, match="token id out of range"):
        exe.run("main", [np.array([0, vocab], np.int64)])


def test_tvm_llvm_pipeline_keeps_8_bit_gathers_and_decodes_the_rest():
    pytest.importorskip("tvm")
    from bitsmith.backends.tvm.targets import get_target
    from bitsmith.passes import parse_pass_spec
    spec = ",".join(get_target("tvm-llvm").pipeline({}).legalize)
    (deq,) = [p for p in parse_pass_spec(spec) if p.name == "dequantize"]
    assert "rtn-int8" not in deq.gathers and "gguf-q8_0" not in deq.gathers
    assert {"rtn-int4", "bitmod-w3", "gguf-q4_1"} <= set(deq.gathers)


def test_roofline_counts_one_packed_row_per_id():
    """The offload planner's traffic for a gather: ids, one row of every packed operand per id
    and the float32 rows written, not the whole table (the generic rule would count it all)."""
    from bitsmith.offload_planning.roofline import op_cost
    attrs, ops = _rtn_int8(1000, 64, 32, 0)
    module = _gather_module(attrs, ops, TensorType((5,), "int64"))
    fn = module.functions[0]
    (node,) = [n for n in fn.nodes if n.op == "qembedding"]
    cost = op_cost(node, fn.value_types())
    per_row = sum(a[0].nbytes for a in ops)  # 64 codes + 2 fp16 scales + 2 zero points
    assert cost.bytes == 5 * 8 + 5 * per_row + 5 * 64 * 4
    assert cost.flops == 5 * 64
