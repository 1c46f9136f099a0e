"""SmolLM2-135M on lut-cpu against the reference target with the same quantization (slow)."""

from __future__ import annotations

import numpy as np
import pytest

import bitsmith
from bitsmith.runtime.generate import forward_logits

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. However little known the feelings or views of such a man may be")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["rtn-int4", "bitmod-w4", "bitmod-w3"])
def test_fp32_tables_match_the_reference_target(smollm2, quant):
    model, tokenizer = smollm2
    ids = np.asarray(tokenizer(TEXT, add_special_tokens=False)["input_ids"], dtype=np.int64)[None, :]
    ref = bitsmith.compile(model, target="reference", quant=quant)
    lut = bitsmith.compile(model, target="lut-cpu", quant=quant, lut_tables="fp32")
    a = forward_logits(ref.run, ref.module, ids)[0]
    b = forward_logits(lut.run, lut.module, ids)[0]
    # fp32 tables differ from the reference's dequantize-then-matmul only in float32 summation
    # order; the bound, about 5x the worst case seen
    assert np.all(np.abs(a - b) <= 1e-3 + 1e-3 * np.abs(a))
    assert np.array_equal(np.asarray(ref.generate(ids[:, :8], max_new_tokens=32)),
                          np.asarray(lut.generate(ids[:, :8], max_new_tokens=32)))
