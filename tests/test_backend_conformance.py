"""The backend-conformance suite (bitsmith.testing) on the built-in CPU targets, and the suite's
own power: a backend that is off, or that refuses an op it declares legal, fails it.

Each target is held to the tolerance its backend declares (Backend.tolerance, with the
measurements behind each number in its docstring). Default run: every case on ``reference``,
a few random modules on tvm-llvm and lut-cpu; the HF models on those two are slow-marked
(a TVM build per model, ~10 s each here).
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Mapping

import numpy as np
import pytest

from bitsmith.backends import base
from bitsmith.backends.reference import ReferenceBackend, ReferenceExecutable
from bitsmith.errors import UnsupportedOpError
from bitsmith.testing import BackendConformanceSuite, ConformanceError, Tolerance, backend_conformance
from bitsmith.ir import GraphBuilder, TensorType
from bitsmith.testing.conformance import check_hf_model, check_module, check_random_modules


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "conformance-cache"))


class TestReferenceConformance(BackendConformanceSuite):
    target = "reference"

    @pytest.mark.slow  # two captures and compiles of the tiny Llama: ~17 s here
    def test_hf_models_match_reference(self):
        super().test_hf_models_match_reference()


def test_reference_is_held_to_bitwise_agreement():
    report = backend_conformance("reference", examples=10, archs=())
    assert report.tolerance == Tolerance(0.0, 0.0) and report.max_errors() == (0.0, 0.0)
    assert len(report.cases) == 20 and report.skipped == 0


@pytest.mark.parametrize("target,options", [("tvm-llvm", {}), ("lut-cpu", {})])
def test_random_modules_on_cpu_targets(target, options):
    pytest.importorskip("tvm")
    results, skipped = check_random_modules(target, options, examples=4)
    assert len(results) == 8 and skipped == 0


@pytest.mark.slow
@pytest.mark.parametrize("target,options,archs", [
    ("tvm-llvm", {}, ("llama", "gpt2", "qwen2")),
    ("lut-cpu", {"quant": "bitmod-w4", "group_size": 32}, ("llama", "gpt2")),  # int8 tables (default)
    ("lut-cpu", {"quant": "rtn-int3", "group_size": 32, "lut_tables": "fp32"}, ("qwen2",)),
])
def test_full_suite_on_cpu_targets(target, options, archs):
    pytest.importorskip("tvm")
    report = backend_conformance(target, options, examples=20, archs=archs)
    assert report.skipped == 0 and len(report.cases) == 40 + 4 * len(archs)
    print(f"{target} {options}: {len(report.cases)} cases within {report.tolerance}; "
          f"max |diff| {report.max_errors()[0]:.3g}")


# ---------------------------------------------------------------- the suite catches faults

class _Off(ReferenceExecutable):
    """The reference, with every float result moved by ``delta``."""

    delta = 1e-3

    def run(self, function, args):
        return [o + o.dtype.type(self.delta) if o.dtype.kind == "f" else o for o in super().run(function, args)]


class _OffBackend(ReferenceBackend):
    name = "off"
    targets = ("off-by-a-little",)

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        return Tolerance(rtol=1e-5, atol=1e-4)

    def build(self, module, target, options):
        return _Off(module)

    load = lambda self, module, target, options, files: _Off(module)  # noqa: E731


class _NoNeg(ReferenceBackend):
    """Declares every op but neg legal (hypothesis tries a lone neg among its first modules);
    builds any module (the reference) unless it holds the op ``refuse``."""

    name = "no-neg"
    targets = ("no-neg",)
    refuse = ""

    def legal_ops(self, target, options):
        from bitsmith.ir.ops import OPS
        return base.LegalOps(ops=frozenset(OPS) - {"neg"})

    def build(self, module, target, options):
        for fn in module.functions:
            for node in fn.nodes:
                if node.op == self.refuse:
                    raise UnsupportedOpError(node.op, target=target)
        return super().build(module, target, options)


class _RefusesSigmoid(_NoNeg):
    name = "refuses-sigmoid"
    targets = ("refuses-sigmoid",)
    refuse = "sigmoid"  # random modules draw it among 9 unary ops


@pytest.fixture
def registered(monkeypatch):
    """Adds backends to the registry for one test."""
    def add(*backends):
        monkeypatch.setattr(base, "_BACKENDS", {**base.backends(), **{b.name: b for b in backends}})
    return add


def test_a_backend_outside_its_tolerance_fails_naming_case_and_element(registered):
    registered(_OffBackend())
    with pytest.raises(ConformanceError, match=r"target off-by-a-little, random module \(built\): result 0: "
                                               r"\d+ of \d+ elements outside rtol=1e-05 atol=0.0001; worst at .*\n(?s:.*)func @main"):
        check_random_modules("off-by-a-little", examples=3)
    _Off.delta = 1e-5  # inside the declared tolerance: passes
    try:
        check_random_modules("off-by-a-little", examples=3)
    finally:
        _Off.delta = 1e-3


@pytest.mark.slow  # two compiles of the tiny Llama: ~20 s here
def test_a_backend_outside_its_tolerance_fails_on_a_model(registered):
    pytest.importorskip("transformers")
    registered(_OffBackend())
    with pytest.raises(ConformanceError, match="llama prefill"):
        check_hf_model("off-by-a-little", "llama")


def test_modules_with_undeclared_ops_are_skipped(registered):
    registered(_NoNeg())
    results, skipped = check_random_modules("no-neg", examples=30)
    assert skipped > 0 and results, (skipped, len(results))


def test_a_declared_op_the_backend_refuses_to_build_fails(registered):
    """Not skipped like an undeclared op: the error reaches the plugin's test (a module built
    by hand, so the check does not hang on which ops hypothesis happens to draw)."""
    registered(_RefusesSigmoid())
    b = GraphBuilder()
    x = b.param("x", TensorType((2, 3), "float32"))
    module = b.module([b.op("sigmoid", [x])])
    with pytest.raises(UnsupportedOpError, match="unsupported op sigmoid"):
        check_module(module, [np.ones((2, 3), np.float32)], "refuses-sigmoid")


# ---------------------------------------------------------------- a test dependency only

def test_import_bitsmith_does_not_import_the_testing_package():
    code = ("import sys, bitsmith, bitsmith.backends, bitsmith.passes; "
            "print(sorted(m for m in sys.modules if m.startswith(('bitsmith.testing', 'hypothesis'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_missing_hypothesis_names_the_test_extra():
    code = "import sys; sys.modules['hypothesis'] = None; import bitsmith.testing"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "ImportError: bitsmith.testing needs hypothesis, from the `test` extra: pip install 'bitsmith[test]'" \
        in out.stderr
