"""The toy target against bitsmith's backend-conformance suite: random modules and small
random-init Llama and GPT-2 models equal the reference interpreter within ToyBackend.tolerance
(float32 kernels against a float64-accumulating oracle; measured <= 2.4e-7 absolute here, so
the report test below also checks the errors stay far inside the declared bound)."""

from __future__ import annotations

from bitsmith.testing import BackendConformanceSuite, backend_conformance


class TestToyConformance(BackendConformanceSuite):
    target = "toy-numpy"
    hf_archs = ("llama", "gpt2")


def test_report_lists_every_case_within_the_declared_tolerance():
    report = backend_conformance("toy-numpy", examples=5, archs=())
    assert len(report.cases) == 10 and report.skipped == 0  # built + loaded per module
    abs_err, _ = report.max_errors()
    assert abs_err <= report.tolerance.atol / 10  # random-module values stay O(10)
