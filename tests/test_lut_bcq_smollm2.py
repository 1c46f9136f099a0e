"""SmolLM2-135M quantized with shiftadd-w3 on lut-cpu (binary-coded planes on the LUT engine)
against the reference target running the very same quantized module (slow)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.runtime.generate import forward_logits

from test_lut_smollm2 import TEXT


@pytest.fixture(scope="module")
def shiftadd_pair(smollm2):
    """(reference, lut-cpu fp32 tables) models of one shiftadd-w3 module: the quantization runs once
    (2 refinement rounds, to keep the test's time sane), and the reference target interprets the
    quantized IR the lut-cpu build runs."""
    model, tokenizer = smollm2
    lut = bitsmith.compile(model, target="lut-cpu", quant="shiftadd-w3", shiftadd_iterations=2, lut_tables="fp32")
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
    # of tests/test_lut_smollm2.py (measured: max |a - b| = 5.2e-4, 34% of the bound)
    assert np.all(np.abs(a - b) <= 1e-3 + 1e-3 * np.abs(a))
    assert np.array_equal(np.asarray(ref.generate(ids[:, :8], max_new_tokens=32)),
                          np.asarray(lut.generate(ids[:, :8], max_new_tokens=32)))
