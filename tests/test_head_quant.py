"""lm_head quantization at compile level (compile option ``head_quant``, issue 15 part 4): by
default the output projection is rtn-int8 (chosen by measurement, benchmarks/results/lm_head.md);
``same`` quantizes it with the scheme, ``fp32`` keeps it; a tied weight is quantized once;
explicit ``layers`` decide on their own. The oracle for the numbers is
the same model with the head quantized by an explicit ``quantize`` pass spec (an independent
route through the pass registry) and ``dequantize`` of the stored codes."""

from __future__ import annotations

import numpy as np
import pytest

import bitsmith
from bitsmith.errors import UnknownOptionError
from bitsmith.ir.quantized import dequantize, qlinear_nodes
from bitsmith.testing.hf_configs import make_model

IDS = np.array([[3, 17, 64, 2, 99, 5]], dtype=np.int64)


@pytest.fixture(scope="module")
def model():
    return make_model("llama")  # tied embeddings


def _head(cm):
    nodes = [n for f in cm.module.functions for n in f.nodes if n.loc and n.loc.module_path == "lm_head"]
    (node,) = [n for n in nodes if n.op in ("linear", "qlinear")]
    return node


def test_default_quantizes_lm_head_to_int8(model):
    cm = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32)
    assert _head(cm).attr("scheme") == "rtn-int8" and cm.options["head_quant"] == "int8"
    assert len(list(qlinear_nodes(cm.module))) == 15  # 7 projections x 2 layers + lm_head


def test_same_quantizes_lm_head_with_the_scheme_once(model):
    cm = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32, head_quant="same")
    head = _head(cm)
    assert head.op == "qlinear" and head.attr("scheme") == "rtn-int4" and head.attr("group_size") == 32
    # tied: one set of codes for lm_head; the embedding gather keeps the float table
    assert [n for n in cm.module.tensors if n.endswith(".codes") and "lm_head" in n] == ["lm_head.weight.codes"]
    explicit = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32, head_quant="fp32",
                                passes="quantize{scheme=rtn-int4,group_size=32,layers=*lm_head}")
    np.testing.assert_array_equal(np.asarray(cm(IDS)), np.asarray(explicit(IDS)))


def test_head_quant_int8_and_fp32(model):
    int8 = bitsmith.compile(model, target="reference", quant="bitmod-w3", group_size=32, head_quant="int8")
    head = _head(int8)
    assert head.op == "qlinear" and head.attr("scheme") == "rtn-int8"
    # the head computes with its dequantized rtn-int8 weight: within half a step of the fp32 one
    weight = model.lm_head.weight.detach().numpy()
    (node, constants), = [(n, c) for _f, n, c in qlinear_nodes(int8.module) if n.loc.module_path == "lm_head"]
    decoded = dequantize(dict(node.attr_dict), [int8.module.tensors[constants[v]] for v in node.inputs[1:]])
    step = (weight.max() - weight.min()) / 255  # >= every group's step; rounding errs by half a step at most
    assert np.abs(decoded - weight).max() <= step
    fp32 = bitsmith.compile(model, target="reference", quant="bitmod-w3", group_size=32, head_quant="fp32")
    assert _head(fp32).op == "linear"
    assert int8.options["head_quant"] == "int8" and fp32.options["head_quant"] == "fp32"


def test_layers_decide_when_given(model):
    cm = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32, layers=["*mlp*"])
    assert _head(cm).op == "linear"
    cm = bitsmith.compile(model, target="reference", quant="rtn-int4", group_size=32, layers=["lm_head"])
    assert _head(cm).op == "qlinear" and len(list(qlinear_nodes(cm.module))) == 1


def test_unknown_or_inapplicable_head_quant_is_refused(model):
    with pytest.raises(UnknownOptionError, match="head_quant"):
        bitsmith.compile(model, target="reference", quant="rtn-int4", head_quant="int4")
    with pytest.raises(ValueError, match="needs a quantization scheme"):
        bitsmith.compile(model, target="reference", head_quant="same")
    with pytest.raises(ValueError, match="applies when layers is not given"):
        bitsmith.compile(model, target="reference", quant="rtn-int4", head_quant="fp32", layers=["*mlp*"])
    with pytest.raises(ValueError, match="quant='gguf'.*head_quant"):
        bitsmith.compile("smollm2-135m", target="reference", quant="gguf", head_quant="fp32")


def test_shiftadd_gets_the_int8_head_and_refuses_same(model):
    cm = bitsmith.compile(model, target="reference", quant="shiftadd-w3", group_size=32, shiftadd_iterations=1)
    head = _head(cm)
    assert head.op == "qlinear" and head.attr("scheme") == "rtn-int8"
    with pytest.raises(ValueError, match="head_quant='same'.*shiftadd"):
        bitsmith.compile(model, target="reference", quant="shiftadd-w3", head_quant="same")


def test_a_gguf_compile_takes_back_the_head_quant_it_records(tmp_path):
    from gguf_files import write_tiny_llama
    path = str(write_tiny_llama(tmp_path / "t.gguf", {"attn_q": "Q4_0"}))
    first = bitsmith.compile(path, target="reference", quant="gguf")
    again = bitsmith.compile(path, target="reference", quant="gguf", head_quant=first.options["head_quant"])
    ids = IDS % 64  # the tiny GGUF's vocabulary
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(first(ids)))
