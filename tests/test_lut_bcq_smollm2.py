"""SmolLM2-135M quantized with shiftadd-w3 on lut-cpu (binary-coded planes on the LUT engine)
against the reference target running the very same quantized module (slow), with and without
the per-group offset (``shiftadd_offset=True``, the form that keeps SmolLM2 usable)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.backends.lut import LUTExecutable, engine_nodes, host, native
from bitsmith.ir import bcq
from bitsmith.runtime.generate import forward_logits

from test_lut_bcq import _bound
from test_lut_executor import EPS32
from test_lut_smollm2 import TEXT


@pytest.fixture(scope="module", params=[True, False], ids=["offset", "no-offset"])
def shiftadd_pair(request, smollm2):
    """(reference, lut-cpu fp32 tables, ids) of one shiftadd-w3 module: the quantization runs once
    per form (2 refinement rounds, to keep the test's time sane), and the reference target
    interprets the quantized IR the lut-cpu build runs."""
    model, tokenizer = smollm2
    lut = bitsmith.compile(model, target="lut-cpu", quant="shiftadd-w3", shiftadd_iterations=2,
                           shiftadd_offset=request.param, lut_tables="fp32")
    ref_backend = backend_for_target("reference")
    ref_options = ref_backend.option_defaults("reference")
    ref = dataclasses.replace(lut, executable=ref_backend.build(lut.module, "reference", ref_options),
                              target="reference", options=ref_options)
    ids = np.asarray(tokenizer(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int64)[None, :]
    return ref, lut, ids


@pytest.mark.slow
def test_fp32_tables_match_the_reference_and_greedy_tokens_are_equal(shiftadd_pair):
    ref, lut, ids = shiftadd_pair
    assert lut.report()["executable"]["streams"]["instructions"].get("BCQACC", 0) > 0
    a = forward_logits(ref.run, ref.module, ids)[0]
    b = forward_logits(lut.run, lut.module, ids)[0]
    # fp32 tables differ from dequantize-then-matmul only in float32 summation order: the bound
    # of tests/test_lut_smollm2.py (measured: max |a - b| = 1.6e-4 with the offset, 5.2e-4 without)
    assert np.all(np.abs(a - b) <= 1e-3 + 1e-3 * np.abs(a))
    assert np.array_equal(np.asarray(ref.generate(ids[:, :8], max_new_tokens=32)),
                          np.asarray(lut.generate(ids[:, :8], max_new_tokens=32)))


@pytest.mark.slow
def test_int8_tables_stay_within_the_table_bound_on_the_models_own_activations(shiftadd_pair):
    # int8 tables move SmolLM2's logits far more than fp32 ones (benchmarks/results/
    # lut_bcq_tables_accuracy.md; as much as for rtn-int3 and bitmod-w3), so every binary-coded
    # layer is checked on the activations the model really feeds it (outlier channels included):
    # the int8 engine's output against the op's meaning (float64 product with the dequantized
    # weight) within the stated table bound (test_lut_bcq._bound, docs/lut-isa.md section 4b,
    # plus the offset term's float32 rounding); a plane weight, scale or index bug breaks it
    _, lut, ids = shiftadd_pair
    module = lut.module
    if not any(bcq.has_offset(node.attr_dict) for _, node in bcq.bcq_nodes(module)):
        pytest.skip("the offset form only (the one users should run): the whole file stays within 1800 s "
                    "on a loaded 2-core machine")
    seen = int8_engine_calls(module, list(lut.executable.layers.values()), ids)
    nodes = {(fn.name, node.outputs[0].name): (node, constants) for fn, node, constants in engine_nodes(module)}
    table_group = backend_for_target("lut-cpu").option_defaults("lut-cpu")["lut_table_group"]
    checked = 0
    for entry, x, y in seen:
        node, constants = nodes[(entry.function, entry.value)]
        if node.op != bcq.OP:
            continue  # lm_head: rtn-int8 (head_quant), a qlinear
        attrs = node.attr_dict
        ops = [module.tensors[constants[v]] for v in node.inputs[1:1 + len(bcq.operand_types(attrs))]]
        want = x.astype(np.float64) @ bcq.dequantize(attrs, ops).astype(np.float64).T
        bound = _bound(attrs, ops[1], x, table_group, True)
        if bcq.has_offset(attrs):
            k, gs = attrs["in_features"], attrs["group_size"]
            off = np.abs(ops[2].astype(np.float64) * bcq.alphas(attrs, ops[1])[-1])[:, np.arange(k) // gs]
            bound = bound + (k / 4 + 16) * EPS32 * (np.abs(x).astype(np.float64) @ off.T)
        # the interpreter's weight is the float64 sum rounded once to float32: half an ulp of each weight
        bound = bound + EPS32 * (np.abs(x).astype(np.float64) @ np.abs(bcq.dequantize(attrs, ops)).T)
        assert np.all(np.abs(y - want) <= bound), entry.layer
        checked += 1
    assert checked == 7 * 30  # every q/k/v/o/gate/up/down of the 30 blocks


def int8_engine_calls(module, layers: list, ids: np.ndarray) -> list[tuple]:
    """(entry, input, output) of every engine layer call of one forward pass of ``module`` on
    lut-cpu with int8 tables (default options), the host being the reference interpreter so
    that each call passes through the recording wrapper (``layers``: the module's LayerEntry)."""
    options = {**backend_for_target("lut-cpu").option_defaults("lut-cpu"), "lut_tables": "int8",
               "lut_host": "reference"}
    seen = []

    def recording(run_layer):
        def run(entry, x2, out=None):
            y = run_layer(entry, x2, out)
            seen.append((entry, np.array(x2), np.array(y)))
            return y
        return run

    isa = native.choose_isa(options["mcpu"])
    exe = LUTExecutable(module, layers, native.build_library(isa=isa), options,
                        lambda lay, run_layer: host.ReferenceHost(module, lay, recording(run_layer)), isa)
    forward_logits(exe.run, module, ids)
    return seen
