"""Pass registry, pass specs, PassManager error reporting and instruments."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
import pytest

from bitsmith.errors import PassError, UnknownOptionError
from bitsmith.ir import GraphBuilder, Module, TensorType
from bitsmith.passes import (PASSES, DumpToFolder, Pass, PassManager, PassTiming, PrintAfter,
                             get_pass, parse_pass_spec, register_pass)


def small_module() -> Module:
    b = GraphBuilder()
    x = b.param("x", TensorType((2,), "float32"))
    c = b.constant("c", np.ones(2, np.float32))
    y = b.op("add", [b.op("relu", [x]), b.op("relu", [x])])
    b.op("neg", [c])  # dead
    return b.module([y])


@dataclass(frozen=True)
class Probe(Pass):
    """A pass with one option of each parsed type; returns its input."""

    name = "probe"
    n: int = 0
    x: float = 0.0
    flag: bool = False
    label: str = ""

    def apply(self, module: Module) -> Module:
        return module


@dataclass(frozen=True)
class Boom(Pass):
    name = "boom"

    def apply(self, module: Module) -> Module:
        raise RuntimeError("kaput")


@dataclass(frozen=True)
class DropFirstNode(Pass):
    """Leaves an operand undefined: an ill-formed module."""

    name = "drop-first"

    def apply(self, module: Module) -> Module:
        fn = module.functions[0]
        return module.with_function(fn.replace(nodes=fn.nodes[1:]))


@pytest.fixture
def probe_registered(monkeypatch):
    monkeypatch.setitem(PASSES, "probe", Probe)


def test_registry_keys_equal_pass_names():
    assert {"dce", "cse", "fold"} <= set(PASSES)
    for key, cls in PASSES.items():
        assert key == cls.name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_register_pass_refuses_bad_classes():
    with pytest.raises(TypeError, match="frozen dataclass"):
        register_pass(type("Loose", (Pass,), {"name": "loose"}))
    with pytest.raises(ValueError, match="registered twice"):
        register_pass(dataclass(frozen=True)(type("Other", (Pass,), {"name": "dce"})))


def test_get_pass_unknown_name_and_option():
    with pytest.raises(UnknownOptionError, match="unknown pass 'nope'; valid: cse, dce, ") as e:
        get_pass("nope")
    assert list(e.value.valid) == sorted(PASSES)
    with pytest.raises(UnknownOptionError, match="option of pass fold 'size'; valid: max_elements"):
        get_pass("fold", size=3)


def test_parse_pass_spec(probe_registered):
    assert parse_pass_spec("dce") == [get_pass("dce")]
    assert [p.name for p in parse_pass_spec("cse, dce ,fold")] == ["cse", "dce", "fold"]
    assert parse_pass_spec("fold{max_elements=1024}") == [get_pass("fold", max_elements=1024)]
    assert parse_pass_spec("") == []
    (p,) = parse_pass_spec("probe{n=3, x=0.5,flag=true,label=hi}")
    assert (p.n, p.x, p.flag, p.label) == (3, 0.5, True, "hi")
    assert parse_pass_spec("probe{label='a b'},probe{}") == [Probe(label="a b"), Probe()]


@pytest.mark.parametrize("spec", ["cse,", ",dce", "cse,,dce", "fold{max_elements}", "fold{=3}",
                                  "fold{max_elements=1", "fold max", "fold{max_elements=1,,}",
                                  "fold{max_elements=1,max_elements=2}", "fold{max_elements=big}"])
def test_malformed_specs_raise_pass_error(spec):
    with pytest.raises(PassError, match="fold|pass spec"):
        parse_pass_spec(spec)


def test_manager_runs_in_order_and_records_timings():
    timing = PassTiming()
    pm = PassManager("cse,dce", instruments=[timing])
    out = pm.run(small_module())
    assert [n.op for n in out.functions[0].nodes] == ["relu", "add"] and len(out.tensors) == 0
    assert [name for name, _ in pm.timings] == ["cse", "dce"]
    assert set(timing.seconds) == {"cse", "dce"} and all(s >= 0 for s in timing.seconds.values())


def test_failing_pass_is_named_with_those_before_it():
    with pytest.raises(PassError) as e:
        PassManager([get_pass("cse"), get_pass("dce"), Boom()]).run(small_module())
    msg = str(e.value)
    assert "pass 'boom' failed" in msg and "passes run before it: cse, dce" in msg and "kaput" in msg


def test_ill_formed_result_is_a_pass_error_unless_verification_is_off():
    with pytest.raises(PassError, match=r"pass 'drop-first' left an ill-formed module \(it was the first pass\).*not defined"):
        PassManager([DropFirstNode()]).run(small_module())
    PassManager([DropFirstNode()], verify=False).run(small_module())


def test_ill_formed_input_is_reported_before_any_pass():
    bad = DropFirstNode().apply(small_module())
    with pytest.raises(PassError, match="input module is ill-formed"):
        PassManager([get_pass("dce")]).run(bad)


def test_print_after_selected_passes(capsys):
    stream = io.StringIO()
    PassManager("cse,dce", instruments=[PrintAfter(["dce"], stream=stream)]).run(small_module())
    text = stream.getvalue()
    assert text.count("IR after pass") == 1 and "after pass dce" in text and "relu" in text
    PassManager("cse,dce", instruments=[PrintAfter()]).run(small_module())
    assert capsys.readouterr().err.count("IR after pass") == 2


def test_dump_to_folder_writes_one_file_per_pass(tmp_path):
    PassManager("cse,fold,dce", instruments=[DumpToFolder(tmp_path / "dump")]).run(small_module())
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["01-cse.txt", "02-fold.txt", "03-dce.txt"]
    assert "relu" in (tmp_path / "dump" / "03-dce.txt").read_text()


@pytest.mark.parametrize("after", [[], ["cse"], ["cse", "dce"]])
def test_verifying_the_ends_names_the_same_pass_as_verifying_each(after):
    """verify="ends" (what compile uses) skips verification between passes, yet a broken module
    is traced to the pass that broke it, with the same message as verify="each" gives, also when
    passes after it ran (or failed) on the broken module."""
    passes = [get_pass("cse"), DropFirstNode()] + [get_pass(n) for n in after]
    with pytest.raises(PassError) as each:
        PassManager(passes, verify="each").run(small_module())
    with pytest.raises(PassError) as ends:
        PassManager(passes, verify="ends").run(small_module())
    assert "pass 'drop-first' left an ill-formed module" in str(each.value)
    assert str(ends.value) == str(each.value)


def test_verifying_the_ends_gives_the_same_module_and_checks_the_input():
    assert PassManager("cse,dce", verify="ends").run(small_module()) == PassManager("cse,dce").run(small_module())
    with pytest.raises(PassError, match="input module is ill-formed"):
        PassManager([get_pass("dce")], verify="ends").run(DropFirstNode().apply(small_module()))
    with pytest.raises(ValueError, match="verify must be"):
        PassManager("dce", verify="sometimes")
