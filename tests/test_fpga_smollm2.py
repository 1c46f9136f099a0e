"""SmolLM2-135M on the fpga simulator: logits within the backend's tolerance of the reference
target and greedy generation of 32 tokens identical (slow: a few minutes on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_smollm2_greedy_32_tokens_equal_reference(smollm2):
    import bitsmith
    from bitsmith.backends.fpga import FPGABackend
    model, _ = smollm2
    fpga = bitsmith.compile(model, target="fpga-u280", max_length=64, prefill_step=64)
    ref = bitsmith.compile(model, target="reference")
    ids = np.array([[1, 504, 3458, 314, 260, 1345]], dtype=np.int64)
    got, want = np.asarray(fpga(ids)), np.asarray(ref(ids))
    tol = FPGABackend().tolerance("fpga-u280", {})
    assert tol.mismatch(got, want) is None, tol.mismatch(got, want)
    a = np.asarray(fpga.generate(ids, max_new_tokens=32))
    b = np.asarray(ref.generate(ids, max_new_tokens=32))
    assert a.tolist() == b.tolist()
