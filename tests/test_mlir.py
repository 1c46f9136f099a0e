"""MLIR interop: export to upstream dialects, MLIR's parser/verifier, import back, and runs in
MLIR's ExecutionEngine compared with the reference interpreter."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("torch_mlir.ir", reason="MLIR interop needs torch-mlir: pip install -e \".[mlir]\"")

from hypothesis import HealthCheck, given, settings  # noqa: E402

from bitsmith.ir import verify_module, GraphBuilder, Module, TensorType, evaluate, parse_module, print_module  # noqa: E402
from bitsmith.mlir import MLIRInteropError, MLIRUnavailableError, export_mlir, run_mlir  # noqa: E402
from bitsmith.mlir.execution import MLIRProgram  # noqa: E402
from bitsmith.mlir.importer import import_module  # noqa: E402
from bitsmith.mlir.registry import standard_ops  # noqa: E402
from bitsmith.testing.strategies import BINARY, REDUCE, UNARY, modules_with_calls, random_modules  # noqa: E402

# Tolerance of an ExecutionEngine run against the interpreter on random modules. Each exported
# op evaluates its defining formula in float32: at most ~8 roundings for the composite
# activations (gelu's tanh form, sigmoid = 1/(1+exp(-x))) and K+4 for softmax, sums, means
# and contractions over K <= 36 elements (strategy dims <= 3*3*4), each <= 2^-24 relative,
# so one op is within ~40 * 2^-24 = 2.4e-6 of the exactly rounded value the interpreter
# gives (it works in float64 and rounds once). Chains of <= 12 such ops, inputs in [-2, 2]
# and weights in [-1, 1] with <= 4 features, can amplify that by the chain's condition;
# rtol 1e-4 leaves a 40x margin, atol 1e-5 covers results that cancel to near zero.
RTOL, ATOL = 1e-4, 1e-5
# The tiny Llama: every logit and cache entry within 1e-5 absolute (the bound). Its
# sums run over K <= 128 terms of size <~ 1, so fp32 accumulation is off by <~ 128 * 2^-24
# = 7.6e-6 in the worst case and ~sqrt(128) * 2^-24 = 7e-7 typically.
LLAMA_ATOL = 1e-5


def _reparse_and_verify(text: str) -> None:
    """MLIR's own parser and verifier, in a fresh context, accept ``text``."""
    from torch_mlir import ir
    with ir.Context() as ctx:
        ctx.allow_unregistered_dialects = True
        assert ir.Module.parse(text).operation.verify()


def _static(module: Module) -> bool:
    return all(isinstance(d, int) for f in module.functions for p in f.params for d in p.type.shape)


def _compare(got: list[np.ndarray], ref: list[np.ndarray], rtol: float, atol: float) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        if r.dtype.kind == "f":
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, equal_nan=True)
        else:
            np.testing.assert_array_equal(g, r)


def test_random_modules_use_only_exported_ops():
    """The property below covers standard ops only: every op the strategies draw has an emitter."""
    drawn = set(UNARY + BINARY + REDUCE) | {"gelu", "softmax", "linear", "matmul", "reshape", "permute", "slice",
                                            "concat", "where", "gt", "le", "ne", "embedding", "scalar", "constant"}
    assert drawn - {"constant"} <= standard_ops()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_modules())
def test_random_modules_export_verify_import_and_run(case):
    module, args = case
    text = export_mlir(module)
    _reparse_and_verify(text)
    assert import_module(text, module.tensors).module == module
    inline = export_mlir(module, inline_weights=True)
    assert import_module(inline).module == module  # the data comes back from the dense attributes
    if _static(module):
        _compare(MLIRProgram(inline, opt_level=0).run("main", args), evaluate(module, args), RTOL, ATOL)


def test_symbolic_dims_become_dynamic_and_come_back():
    b = GraphBuilder()
    b.param("x", TensorType(("batch", "seq", 4), "float32"))
    y = b.op("reshape", ["x"], {"shape": ("batch*seq", 4)})
    z = b.op("concat", [y, y], {"axis": 0})
    module = b.module([z])
    text = export_mlir(module)
    assert "tensor<?x?x4xf32>" in text and 'bitsmith.shape = ["batch", "seq", 4]' in text
    assert import_module(text).module == module


@pytest.fixture(scope="module")
def tiny_llama():
    from mlir_cases import tiny_llama_module
    return tiny_llama_module(batch=1, seq=5, past=3)


def test_tiny_llama_runs_in_execution_engine(tiny_llama):
    module, args = tiny_llama
    got = run_mlir(module, args)
    ref = evaluate(module, args)
    _compare(got, ref, 0.0, LLAMA_ATOL)


@pytest.mark.parametrize("attention", ["bitsmith", "linalg"])
def test_tiny_llama_round_trip(tiny_llama, attention):
    module, _ = tiny_llama
    text = export_mlir(module, attention=attention)
    _reparse_and_verify(text)
    assert ("bitsmith.attention" in text) == (attention == "bitsmith")
    assert import_module(text, module.tensors).module == module
    bare = import_module(text)  # no data: every weight is listed by name, shape and hash
    assert {i.name for i in bare.missing} == set(module.tensors)
    assert tuple(sorted(bare.missing, key=lambda i: i.name)) == module.tensors.infos()
    assert verify_module(bare.module) == module  # known by name, shape and hash: equal, verifies


def test_external_weights_keep_the_file_small(tiny_llama):
    module, _ = tiny_llama
    external, inline = export_mlir(module), export_mlir(module, inline_weights=True)
    assert len(external) < module.tensors.nbytes() / 2 < len(inline)
    assert external.count("ml_program.global private") == len(module.tensors)


def test_import_refuses_tensors_that_do_not_match(tiny_llama):
    module, _ = tiny_llama
    text = export_mlir(module)
    name = sorted(module.tensors)[0]
    wrong = dict(module.tensors)
    wrong[name] = np.asarray(wrong[name]) + np.ones((), wrong[name].dtype)
    with pytest.raises(MLIRInteropError, match="sha256"):
        import_module(text, wrong)


def test_quantized_llama_exports_qlinear_as_bitsmith_op():
    import bitsmith
    from bitsmith.testing.hf_configs import make_model

    module = bitsmith.compile(make_model("llama"), target="reference", quant="bitmod-w4", group_size=32).module
    text = export_mlir(module)
    _reparse_and_verify(text)
    assert '"bitsmith.qlinear"' in text and 'scheme = "bitmod-w4"' in text
    assert import_module(text, module.tensors).module == module


def test_import_refuses_rewired_operands():
    b = GraphBuilder()
    b.param("x", TensorType((2, 3), "float32"))
    b.param("y", TensorType((2, 3), "float32"))
    module = b.module([b.op("sub", ["x", "y"])])
    text = export_mlir(module).replace('bitsmith.op = "sub"', 'bitsmith.operands = [0, 5], bitsmith.op = "sub"')
    with pytest.raises(MLIRInteropError, match="operands"):
        import_module(text)


def test_calls_and_function_attributes_round_trip():
    from bitsmith.ir import Function, Node, Value
    t = TensorType((2, 3), "float32")
    inner = Function("act", (Value("a", t),), (Node("tanh", ("a",), (Value("b", t),)),), ("b",))
    inner = inner.replace(attrs=(("device", "attention"),))
    outer = Function("main", (Value("x", t),), (Node("call", ("x",), (Value("y", t),), (("callee", "act"),)),), ("y",))
    module = Module((outer, inner))
    text = export_mlir(module)
    assert "call @act(" in text and 'bitsmith.device = "attention"' in text
    assert import_module(text).module == module
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    _compare(run_mlir(module, [x]), evaluate(module, [x]), RTOL, ATOL)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(modules_with_calls())
def test_modules_with_calls_export_import_and_run(case):
    """Functions as func.func, calls as func.call, function attributes as bitsmith.<key>."""
    module, original, args = case
    text = export_mlir(module)
    _reparse_and_verify(text)
    assert import_module(text, module.tensors).module == module
    if _static(module):
        _compare(run_mlir(module, args, opt_level=0), evaluate(original, args), RTOL, ATOL)


def test_uint8_arithmetic_is_refused_naming_the_node():
    from bitsmith.errors import UnsupportedOpError
    from bitsmith.ir import Location
    b = GraphBuilder()
    b.param("c", TensorType((4,), "uint8"))
    module = b.module([b.op("add", ["c", "c"], loc=Location("m.q", "q.py:1"))])
    with pytest.raises(UnsupportedOpError, match=r"add \(module m\.q, source q\.py:1, target mlir\)"):
        export_mlir(module)


def test_missing_bindings_name_the_extra(monkeypatch):
    from bitsmith.mlir import bindings
    monkeypatch.setitem(sys.modules, "torch_mlir.ir", None)  # import now fails as if not installed
    with pytest.raises(MLIRUnavailableError, match=r"\.\[mlir\]"):
        bindings.ir()


def test_cli_export_from_artifact_and_import(tmp_path, tiny_llama, capsys):
    import bitsmith
    from bitsmith.cli import main
    from bitsmith.testing.hf_configs import make_model

    cm = bitsmith.compile(make_model("llama"), target="reference")
    cm.save(str(tmp_path / "art"))
    out = tmp_path / "m.mlir"
    assert main(["export-mlir", str(tmp_path / "art"), "-o", str(out)]) == 0
    _reparse_and_verify(out.read_text())
    for extra in ([], ["--artifact", str(tmp_path / "art")]):
        ir_file = tmp_path / f"m{len(extra)}.ir"
        assert main(["import-mlir", str(out), "--out", str(ir_file)] + extra) == 0
        assert ir_file.read_text() == print_module(cm.module)
        assert parse_module(ir_file.read_text(), cm.module.tensors) == cm.module
    assert "referenced by name, shape and sha256 only" in capsys.readouterr().err
    assert main(["export-mlir", str(tmp_path / "art"), "-o", str(out), "--quant", "bitmod-w4"]) == 2
