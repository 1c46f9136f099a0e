"""Calibration runners (statistics on a compiled target equal the reference interpreter's),
sequential calibration's mechanics, the calibration options of compile / the CLI, and the
rule that passes import no backend."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import bitsmith
from bitsmith.compression import CompressionOptions
from bitsmith.ir.interpreter import run_function
from bitsmith.passes import get_pass
from bitsmith.passes.quantization.calibration import (InterpreterRunner, calibration_windows, collect_statistics,
                                                      linear_inputs, main_arguments, probe_module)
from bitsmith.passes.quantization.sequential import run_sequential, stage_order
from bitsmith.testing.hf_configs import VOCAB, make_model

ROOT = Path(__file__).resolve().parents[1]
HAS_TVM = importlib.util.find_spec("tvm") is not None


@pytest.fixture(scope="module")
def llama():
    return bitsmith.compile(make_model("llama")).module


@pytest.fixture(scope="module")
def windows():
    rng = np.random.default_rng(0)
    return calibration_windows(rng.integers(0, VOCAB, size=3 * 40), sequences=3, length=40)


# ---------------------------------------------------------------- runners

def test_probe_runs_only_what_the_linear_inputs_need(llama, windows):
    names = list(linear_inputs(llama))
    probe = probe_module(llama, names)
    assert probe.function("main").results == tuple(names)
    paths = {n.loc.module_path for n in probe.function("main").nodes if n.op == "linear" and n.loc}
    assert "lm_head" not in paths  # nothing after the last layer's input
    # the probe's values are the full model's (same interpreter, same nodes)
    seen = {}
    run_function(llama, "main", main_arguments(llama, windows[0]),
                 observe=lambda node, outs: seen.update({o.name: a for o, a in zip(node.outputs, outs)}))
    for name, got in zip(names, run_function(probe, "main", main_arguments(llama, windows[0]))):
        np.testing.assert_array_equal(got, seen[name])


@pytest.mark.skipif(not HAS_TVM, reason="tvm-llvm needs TVM")
def test_tvm_llvm_statistics_equal_the_reference(llama, windows):
    from bitsmith.backends.calibration import BackendRunner, calibration_runner
    assert calibration_runner("auto") == BackendRunner("tvm-llvm")  # the fastest CPU target here
    want = collect_statistics(llama, windows)
    got = collect_statistics(llama, windows, runner=BackendRunner("tvm-llvm"))
    assert set(got) == set(want)
    for name in want:
        # tvm-llvm computes the forward in float32 (the reference rounds float64 sums once per
        # op): measured differences here are at most 2.5e-7 of the largest Hessian entry, on
        # SmolLM2 (8 windows of 512) 5.0e-7 (benchmarks/results/calibration_speed.md); 1e-4
        # leaves a wide margin for other CPUs' vector widths and summation orders
        scale = np.abs(want[name].hessian).max()
        np.testing.assert_allclose(got[name].hessian, want[name].hessian, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(got[name].column_norms, want[name].column_norms, rtol=1e-4)
        assert got[name].tokens == want[name].tokens == 3 * 40


def test_calib_target_choices():
    from bitsmith.backends.calibration import calibration_runner
    from bitsmith.errors import UnknownOptionError
    assert isinstance(calibration_runner("reference"), InterpreterRunner)
    with pytest.raises(UnknownOptionError, match="calib_target"):
        calibration_runner("no-such-target")
    with pytest.raises(UnknownOptionError, match="no-such-target"):
        CompressionOptions.from_options({"calib_target": "no-such-target"})


def test_passes_import_no_backend():
    """Passes get a runner from the API (bitsmith.backends.calibration); they never import a
    backend themselves, absolute or relative."""
    offenders = []
    for path in sorted((ROOT / "bitsmith" / "passes").rglob("*.py")):
        package = ["bitsmith"] + list(path.relative_to(ROOT / "bitsmith").parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            if any(t == "bitsmith.backends" or t.startswith("bitsmith.backends.") for t in targets):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


# ---------------------------------------------------------------- sequential

class WindowCalibration:
    """A calibration source over fixed windows that records what each stage's step received."""

    def __init__(self, windows, runner=None):
        self.windows, self.runner, self.recorded = windows, runner or InterpreterRunner(), {}

    def __call__(self, module):
        return collect_statistics(module, self.windows, runner=self.runner)

    def sequential(self, module, stages, step):
        def spy(mod, value, stats):
            self.recorded[value] = stats
            return step(mod, value, stats)
        return run_sequential(module, self.windows, stages, spy, self.runner)


def tvm_runner():
    from bitsmith.backends.calibration import BackendRunner
    return BackendRunner("tvm-llvm")


@pytest.mark.parametrize("make_runner, tolerance", [
    (InterpreterRunner, 1e-9),  # same interpreter, same float32 Gram per window: float64 round-off
    # segments built for tvm-llvm: float32 forward vs the reference's, as in the runner test above
    pytest.param(tvm_runner, 1e-4, marks=[pytest.mark.slow, pytest.mark.skipif(not HAS_TVM, reason="needs TVM")]),
])
def test_sequential_statistics_come_from_the_quantized_layers_before(llama, windows, make_runner, tolerance):
    """Stage k's statistics must be those of its input computed with every layer before it
    quantized: checked against one whole-model interpreter run of the final quantized module
    (layers at or after stage k cannot change stage k's input, so the final module gives what
    stage k saw), and they must differ from the full-precision statistics after the first stage."""
    calib = WindowCalibration(windows, make_runner())
    quantized = get_pass("quantize", scheme="rtn-int2", group_size=16, calibrate=True, calibration=calib,
                         sequential=True).apply(llama)
    assert not [n for n in quantized.function("main").nodes if n.op == "linear"
                and n.loc and n.loc.module_path != "lm_head"]
    independent = collect_statistics(quantized, windows)  # keyed by the qlinear inputs now
    full_precision = collect_statistics(llama, windows)
    order = stage_order(llama, list(calib.recorded))
    assert order == list(calib.recorded)  # stages ran in the order main computes their inputs
    assert len(order) == 8  # per decoder layer: q/k/v input, o input, gate/up input, down input
    for k, value in enumerate(order):
        got, want = calib.recorded[value].hessian, independent[value].hessian
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * np.abs(want).max())
        moved = np.abs(got - full_precision[value].hessian).max() / np.abs(want).max()
        assert (moved <= tolerance) if k == 0 else (moved > 1e-3), (k, moved)


@pytest.mark.slow  # two compiles from an HF directory: ~30 s on 2 cores
def test_sequential_with_act_order_through_compile(tmp_path):
    """End to end on the tiny model: compile with every calibration option, by text and tokenizer."""
    from tiny_llama import random_text, save_tiny_llama
    model_dir = save_tiny_llama(tmp_path / "tiny")
    text = tmp_path / "calib.txt"
    text.write_text(random_text(200)[0])
    kwargs = dict(quant="rtn-int4", group_size=16, calibrate=True, calib_text=str(text), calib_sequences=3,
                  calib_seq_len=32, calib_target="reference")
    plain = bitsmith.compile(str(model_dir), **kwargs)
    full = bitsmith.compile(str(model_dir), calib_sequential=True, act_order=True, calib_damp=0.05, **kwargs)
    ids = random_text(20, seed=3)[1][None, :]
    a, b = (cm(ids).numpy() for cm in (plain, full))
    assert np.isfinite(b).all() and not np.array_equal(a, b)  # the options reached the pass
    assert np.abs(a - b).max() < 0.5 * np.abs(a).max()  # both are 4-bit versions of one model
    options = full.report()["options"]
    assert options["calib_sequential"] is True and options["act_order"] is True and options["calib_damp"] == 0.05


# ---------------------------------------------------------------- option errors

@pytest.mark.parametrize("options, words", [
    ({"quant": "rtn-int4", "act_order": True}, "act_order is an option of GPTQ calibration: it needs calibrate=True"),
    ({"quant": "rtn-int4", "calib_sequential": True}, "calib_sequential is an option of GPTQ calibration"),
    ({"quant": "rtn-int4", "calibrate": True, "calib_text": __file__, "calib_damp": -1}, "calib_damp"),
])
def test_option_errors(options, words):
    with pytest.raises(ValueError, match=words):
        CompressionOptions.from_options(dict(options))


def test_quantize_pass_option_errors():
    with pytest.raises(ValueError, match="act_order needs calibrate=true"):
        get_pass("quantize", scheme="fp4", act_order=True)
    with pytest.raises(ValueError, match="sequential needs calibrate=true"):
        get_pass("quantize", scheme="fp4", sequential=True)
    with pytest.raises(ValueError, match="sequential\\(\\) method"):
        get_pass("quantize", scheme="fp4", calibrate=True, sequential=True, calibration=lambda m: {}).apply(
            bitsmith.compile(make_model("llama")).module)


def test_cli_flags_reach_the_compile_options(capsys):
    from bitsmith.cli import _quant_options, build_parser
    from test_cli import assert_one_line_error, run_cli
    args = build_parser().parse_args(["compile", "m", "--target", "reference", "--out", "o", "--quant", "rtn-int3",
                                      "--calibrate", "--calib-text", __file__, "--calib-sequential", "--act-order",
                                      "--calib-damp", "0.1", "--calib-target", "reference"])
    assert _quant_options(args) == {"quant": "rtn-int3", "calib_text": __file__, "calib_damp": 0.1,
                                    "calib_target": "reference", "calibrate": True, "calib_sequential": True,
                                    "act_order": True}
    for command in ("compile", "eval"):
        argv = [command, "m", "--quant", "rtn-int3", "--act-order"]
        argv += ["--target", "reference", "--out", "o"] if command == "compile" else ["--text", __file__]
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "act_order is an option of GPTQ calibration")
