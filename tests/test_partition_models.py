"""partition on captured language models: the decode-capable main split into attention vs the
rest computes the unpartitioned logits and cache bit for bit (prefill and decode), and a
partitioned module compiled for the reference target saves and loads as an artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bitsmith
from bitsmith.ir import Module, run_function
from bitsmith.passes import PassManager
from bitsmith.passes.cut_report import cut_report
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.generate import empty_cache, main_args, positions
from pass_checks import assert_bitwise_equal

ATTENTION_KV = "partition{pattern=attention_kv,device=attention}"


def prefill_and_decode(module: Module, ids: np.ndarray) -> list[list[np.ndarray]]:
    n = ids.shape[1]
    prefill = run_function(module, "main", main_args(module, ids, positions(1, 0, n), empty_cache(module, 1)))
    token = prefill[0][:, -1:].argmax(-1).astype(np.int64)
    return [prefill, run_function(module, "main", main_args(module, token, positions(1, n, 1), prefill[1:]))]


@pytest.mark.slow  # a torch.export capture: ~20-45 s on a shared 2-core machine
def test_partitioned_tiny_llama_runs_saves_and_loads(tmp_path: Path):
    import dataclasses

    from bitsmith.backends.reference import ReferenceBackend
    from bitsmith.testing.hf_configs import make_model
    plain = bitsmith.compile(make_model("llama"), target="reference")
    module = PassManager(ATTENTION_KV).run(plain.module)
    part = dataclasses.replace(plain, module=module, executable=ReferenceBackend().build(module, "reference", {}))
    callees = [f for f in module.functions if f.attr("device") == "attention"]
    assert len(callees) == 2 and all(sorted(n.op for n in f.nodes) == ["attention", "concat", "concat"]
                                     for f in callees)
    ids = np.array([[5, 17, 3, 99, 42]], dtype=np.int64)
    for want, got in zip(prefill_and_decode(plain.module, ids), prefill_and_decode(module, ids)):
        assert_bitwise_equal(got, want)

    part.save(tmp_path / "art")
    loaded = load_artifact(tmp_path / "art")
    assert loaded.module == module
    assert [f.attrs for f in loaded.module.functions] == [f.attrs for f in module.functions]
    for want, got in zip(prefill_and_decode(module, ids), prefill_and_decode(loaded.module, ids)):
        assert_bitwise_equal(got, want)
    assert np.asarray(loaded.generate(ids, 4)).tolist() == np.asarray(plain.generate(ids, 4)).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["partition{trait=attention,device=attention}", ATTENTION_KV])
def test_smollm2_attention_partition_is_bitwise_identical(smollm2, smollm2_compiled, spec):
    module = smollm2_compiled.module
    part = PassManager(spec).run(module)
    report = cut_report(part)
    assert len(part.functions) == 31 and len(report.calls) == 30  # one sub-function per layer
    ids = np.array([smollm2[1].encode("The capital of France is", add_special_tokens=False)], dtype=np.int64)
    for want, got in zip(prefill_and_decode(module, ids), prefill_and_decode(part, ids)):
        assert_bitwise_equal(got, want)
    if spec == ATTENTION_KV:  # per decode token: q (9 heads), new k and v (3 heads each), output (9 heads)
        per_layer = 4 * 64 * (9 + 3 + 3 + 9)
        assert report.nbytes({"batch": 1, "seq": 1, "past": 1000}, exchanged_only=True) == 30 * per_layer
