"""SmolLM2-135M compiled with --offload-attention for tvm-llvm: greedy 32 tokens with 1 and 2
attention workers (2 + 1 split of its 3 kv heads) equal the single-process offloaded run token for
token, the bytes rank 0 moves equal the pass's prediction, and the prompt's logits are within
tvm-llvm's tolerance of the unsplit reference model (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from offload_rank0 import run_rank0

pytestmark = pytest.mark.slow  # a SmolLM2 compile and 3 runs of up to 3 processes: minutes here
NEW = 32


@pytest.fixture(scope="module")
def offloaded(smollm2, tmp_path_factory):
    model, _ = smollm2
    path = tmp_path_factory.mktemp("smollm2-off") / "art"
    bitsmith.compile(model, target="tvm-llvm", offload_attention=True).save(path)
    return path


def test_smollm2_workers_equal_single_process(smollm2, smollm2_compiled, offloaded, tmp_path):
    _, tokenizer = smollm2
    prompt = [tokenizer.encode("The capital of France is", add_special_tokens=False)]
    tokens, logits, _ = run_rank0(offloaded, 0, False, prompt, NEW, tmp_path / "single.npz")
    tol = backend_for_target("tvm-llvm").tolerance("tvm-llvm", {})
    assert tol.mismatch(logits, np.asarray(smollm2_compiled(np.asarray(prompt)))) is None
    n = len(prompt[0])
    per_token = (30 * 4 * 64 * (9 + 3 + 3), 30 * 4 * 64 * 9)  # q + new k, v sent; output back; 30 layers
    for workers in (1, 2):
        got, got_logits, stats = run_rank0(offloaded, workers, False, prompt, NEW, tmp_path / f"w{workers}.npz")
        np.testing.assert_array_equal(got, tokens)
        np.testing.assert_array_equal(got_logits, logits)  # the same programs on the same heads' data
        assert stats["heads"] == ([[0, 3]] if workers == 1 else [[0, 2], [2, 3]])
        steps = 2 * n + NEW - 1  # logits call and generate's prefill (n tokens each), NEW - 1 decode steps
        assert (stats["bytes_sent"], stats["bytes_received"]) == (steps * per_token[0], steps * per_token[1])
