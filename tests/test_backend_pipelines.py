"""Backend pipelines (legalize -> lower -> finalize) and the legality check after them.

Every built-in target refuses, after its pipeline, an op it has no lowering for, with an
UnsupportedOpError naming op, module path, source line, function and target; the attribute
checks refuse what the lowerings refuse (annotated linears on tvm, N:M qlinears on lut-cpu);
the phases run in the compile's PassManager (print_after sees them, compile_info lists them);
the golden cases of the passes that left hidden places (kv-cache, half-precision) hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

import bitsmith
from bitsmith.backends.base import Pipeline, targets
from bitsmith.backends.reference import ReferenceBackend
from bitsmith.errors import PluginError, UnsupportedOpError
from bitsmith.ir import Location, Node, TensorTable, Value, parse_module
from bitsmith.ir.ops import OPS, register_op
from bitsmith.passes import PASSES, Pass, PassManager, register_pass

FAKE_OP = "test_unlowerable"
WHERE = Location("net.0", "test_backend_pipelines.py:42")
GOLDEN = Path(__file__).parent / "passes"
BUILT_IN = ("reference", "tvm-llvm", "tvm-cuda", "lut-cpu", "fpga-u280")


@dataclass(frozen=True)
class _AppendFakeOp(Pass):
    """Passes the first result of the first function through FAKE_OP (located at WHERE)."""

    name = "test-append-unlowerable"

    def apply(self, module):
        fn = module.functions[0]
        r = fn.results[0]
        out = Value(r + "_fake", fn.value_types()[r])
        node = Node(FAKE_OP, (r,), (out,), (), WHERE)
        return module.replace(functions=(fn.replace(nodes=fn.nodes + (node,), results=(out.name,) + fn.results[1:]),)
                              + module.functions[1:])


@pytest.fixture
def fake_op():
    """FAKE_OP (typed like its input; no interpreter rule, no lowering) and the pass appending
    it, registered for one test and removed afterwards, so no other test sees them."""
    register_op(FAKE_OP, 1)(lambda types, attrs: (types[0],))
    register_pass(_AppendFakeOp)
    try:
        yield _AppendFakeOp.name
    finally:
        OPS.pop(FAKE_OP, None)
        PASSES.pop(_AppendFakeOp.name, None)


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return model, (torch.randn(2, 8),)


def test_every_built_in_target_is_registered():
    assert set(BUILT_IN) <= set(targets())


@pytest.mark.parametrize("target", BUILT_IN)
def test_an_op_the_target_does_not_accept_is_named_with_its_place(fake_op, target):
    """Refused after the pipeline, before build (no kernel is compiled, nvcc is never asked)."""
    model, example = _mlp()
    with pytest.raises(UnsupportedOpError) as info:
        bitsmith.compile(model, target=target, example_inputs=example, passes=fake_op)
    e = info.value
    assert (e.op, e.module_path, e.source, e.target) == (FAKE_OP, WHERE.module_path, WHERE.source, target)
    assert e.function
    for part in (FAKE_OP, f"module {WHERE.module_path}", f"source {WHERE.source}", f"function {e.function}",
                 f"target {target}"):
        assert part in str(e), str(e)


@pytest.mark.parametrize("target, options, op, words", [
    ("tvm-llvm", {"sparsity": "2:4"}, "linear", "sparsity/outlier annotations"),
    ("tvm-cuda", {"sparsity": "2:4", "nvcc": "skip"}, "linear", "sparsity/outlier annotations"),
    ("lut-cpu", {"quant": "rtn-int4", "group_size": 8, "sparsity": "2:4"}, "qlinear", "N:M sparsity (2:4)"),
])
def test_attributes_the_target_refuses_are_named(target, options, op, words):
    """An op the target has, with attributes its lowering cannot take (the reason is the
    lowering's own); the module path is the torch module the node came from."""
    model, example = _mlp()
    with pytest.raises(UnsupportedOpError) as info:
        bitsmith.compile(model, target=target, example_inputs=example, **options)
    e = info.value
    assert (e.op, e.target) == (op, target) and words in str(e), str(e)
    assert e.module_path in ("0", "2") and e.function, str(e)  # nn.Sequential's linears


def test_phases_run_in_the_pass_manager_and_are_listed(capsys):
    """tvm-cuda's lower phase (half-precision): printed by print_after, verified, listed in
    compile_info; the module the artifact stores is its result (float16 parameters)."""
    model, example = _mlp()
    cm = bitsmith.compile(model, target="tvm-cuda", example_inputs=example, nvcc="skip",
                          print_after="half-precision")
    assert cm.compile_info["pipeline"][-1] == "half-precision"
    assert "IR after pass half-precision" in capsys.readouterr().err
    assert [p.type.dtype for p in cm.module.functions[0].params] == ["float16"]
    fp32 = bitsmith.compile(model, target="tvm-cuda", example_inputs=example, nvcc="skip", act_dtype="float32")
    assert "half-precision" not in fp32.compile_info["pipeline"]
    assert [p.type.dtype for p in fp32.module.functions[0].params] == ["float32"]


def test_a_causal_lm_gets_its_kv_cache_from_the_first_pass():
    from bitsmith.testing.hf_configs import make_model
    cm = bitsmith.compile(make_model("llama"), target="reference")
    assert cm.compile_info["pipeline"][0] == "kv-cache"
    fn = cm.module.function("main")
    assert [p.name for p in fn.params[2:]] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1",
                                               "attention_mask"]
    assert cm.module.attr("num_layers") == 2 and cm.module.attr("kv_heads") == (2, 2)


def test_a_pipeline_that_is_not_a_pipeline_is_a_plugin_error(monkeypatch):
    monkeypatch.setattr(ReferenceBackend, "pipeline", lambda self, target, options: ["dce"])
    model, example = _mlp()
    with pytest.raises(PluginError, match="must return a bitsmith.backends.base.Pipeline"):
        bitsmith.compile(model, target="reference", example_inputs=example)


def test_a_plugin_pipeline_runs_its_phases_in_order(monkeypatch, capsys):
    monkeypatch.setattr(ReferenceBackend, "pipeline",
                        lambda self, target, options: Pipeline(legalize=("cse",), lower=("fold",), finalize=("dce",)))
    model, example = _mlp()
    cm = bitsmith.compile(model, target="reference", example_inputs=example)
    assert cm.compile_info["pipeline"][-3:] == ["cse", "fold", "dce"]


@pytest.mark.parametrize("target", ["reference", "tvm-llvm", "lut-cpu"])
def test_a_partitioned_module_runs_on_every_cpu_target(target):
    """The user's partition runs before the backend's phases: reference runs the calls itself,
    tvm-llvm and lut-cpu inline them in their legalize phase; results as the unpartitioned
    module's on the same target (bitwise: the same kernels over the same graph)."""
    model, example = _mlp()
    split = bitsmith.compile(model, target=target, example_inputs=example, passes="partition{trait=elementwise}")
    whole = bitsmith.compile(model, target=target, example_inputs=example)
    names = [f.name for f in split.module.functions]
    pipeline = split.compile_info["pipeline"]
    assert "partition" in pipeline
    if target == "reference":
        assert len(names) == 2 and "inline" not in pipeline
    else:
        assert names == ["main"] and pipeline.index("inline") > pipeline.index("partition")
    x = example[0].numpy()
    np.testing.assert_array_equal(split.run("main", [x])[0], whole.run("main", [x])[0])


def test_half_precision_names_its_casts_apart_from_the_users_values_and_runs_once():
    """A user value already called x_f does not clash with the cast of x; a second run (a
    user's --pass before tvm-cuda's own phase) leaves the converted module as it is."""
    case = GOLDEN / "half-precision" / "rotary-and-rmsnorm"
    tensors = TensorTable(safetensors.numpy.load_file(str(case) + ".safetensors"))
    text = Path(str(case) + ".before.ir").read_text()
    assert "%v6 " in text and "%x_f" not in text
    module = parse_module(text.replace("%v6", "%x_f"), tensors)
    once = PassManager("half-precision").run(module)  # verifies: no value defined twice
    assert PassManager("half-precision").run(once) == once
    assert once.attr("activations") == "float16"


def test_half_precision_keeps_interpreter_results_within_fp16_rounding():
    """The golden half-precision case on the interpreter against its float32 module: within
    4e-3 of max|y| (a handful of fp16 roundings, u = 4.9e-4 each, on a 4-wide dot product)."""
    from bitsmith.ir import run_function
    from bitsmith.passes.half_precision import to_half
    case = GOLDEN / "half-precision" / "rotary-and-rmsnorm"
    tensors = TensorTable(safetensors.numpy.load_file(str(case) + ".safetensors"))
    module = parse_module(Path(str(case) + ".before.ir").read_text(), tensors)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    pos = np.arange(300, 305).reshape(5, 1)  # positions where fp16 angles would be off
    ref = run_function(module, "main", [x, pos])[0]
    got = run_function(to_half(module), "main", [x.astype(np.float16), pos])[0].astype(np.float32)
    assert np.abs(got - ref).max() <= 4e-3 * np.abs(ref).max()
