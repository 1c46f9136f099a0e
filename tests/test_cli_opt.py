"""``bitsmith opt``, run in-process through ``main``; every result is checked against running
the same passes through the API (PassManager on the module with its data)."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bitsmith.ir import Module, evaluate, parse_module, print_module
from bitsmith.opt import TensorDataRequiredError, load_module, read_safetensors, run_pipeline, write_safetensors
from bitsmith.passes import PASSES, Pass, PassManager
from pass_checks import assert_bitwise_equal
from quant_modules import UP, mlp_module
from test_cli import run_cli

QUANTIZE = "quantize{scheme=rtn-int4,group_size=8}"


def assert_one_line_error(code: int, err: str, *words: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitsmith: error: "), err
    for w in words:
        assert w in lines[0], err
    return lines[0]


def with_duplicates(module: Module) -> Module:
    """The module with every node repeated (outputs renamed, uses unchanged): work for cse,
    then dead copies for dce."""
    fn = module.functions[0]
    nodes = []
    for n in fn.nodes:
        nodes += [n, n.replace(outputs=tuple(o.__class__(o.name + ".dup", o.type) for o in n.outputs))]
    return module.replace(functions=(fn.replace(nodes=tuple(nodes)),))


@pytest.fixture
def mlp(tmp_path: Path) -> tuple[Module, Path, Path]:
    """(module with data, its IR text file, its weights file)."""
    module = with_duplicates(mlp_module())
    ir, weights = tmp_path / "mlp.ir", tmp_path / "mlp.safetensors"
    ir.write_text(print_module(module))
    write_safetensors(dict(module.tensors), weights)
    return module, ir, weights


def api(module: Module, spec: str) -> Module:
    return PassManager(spec).run(module)


def test_stdin_to_stdout_without_data(capsys, monkeypatch, mlp):
    module, ir, _ = mlp
    monkeypatch.setattr("sys.stdin", io.StringIO(ir.read_text()))
    code, out, err = run_cli(capsys, "opt", "-", "-p", "cse,dce")
    assert code == 0 and err == ""
    assert out == print_module(api(module, "cse,dce"))
    assert "dup" not in out and out != ir.read_text()


def test_out_file_and_repeated_pass_flags(capsys, tmp_path, mlp):
    module, ir, _ = mlp
    out_file = tmp_path / "out.ir"
    code, out, err = run_cli(capsys, "opt", str(ir), "--pass", "cse", "-p", "dce", "-o", str(out_file))
    assert (code, out, err) == (0, "", "")
    assert out_file.read_text() == print_module(api(module, "cse,dce"))
    assert not out_file.with_suffix(".safetensors").exists()  # no new constants: nothing to write


def test_print_after_all_shows_each_pass_in_order(capsys, mlp):
    module, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "-p", "cse,dce", "--print-after-all")
    assert code == 0
    parts = re.split(r"^// ----- IR after pass (\w+) -----\n", err, flags=re.M)
    assert parts[0] == "" and parts[1::2] == ["cse", "dce"]
    assert parts[2] == print_module(api(module, "cse"))
    assert parts[4] == out == print_module(api(module, "cse,dce"))


def test_list_passes_names_every_pass_with_options(capsys):
    code, out, _ = run_cli(capsys, "opt", "--list-passes")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if not line.startswith(" ")}
    assert listed == set(PASSES)
    assert "    max_elements: int = 1048576" in out.splitlines()
    assert re.search(r"^quantize +Replaces selected ``linear`` nodes", out, re.M)  # no "Pass ``quantize``:" echo
    assert "    scheme: str = ''" in out and "calibration: object = None  (API only)" in out


@pytest.mark.parametrize("spec, words", [
    ("cse{", ["pass spec"]),
    ("cse;dce", ["pass spec", "';'"]),
    ("nosuch", ["unknown pass 'nosuch'", "cse", "dce"]),
    ("fold{max_elements=many}", ["max_elements", "int"]),
    ("quantize{scheme=int9}", ["int9", "rtn-int4"]),
])
def test_bad_pass_spec_is_one_clear_line(capsys, mlp, spec, words):
    _, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "-p", spec)
    assert out == ""
    assert_one_line_error(code, err, *words)


def test_no_file_is_an_error(capsys):
    assert_one_line_error(*run_cli(capsys, "opt", "-p", "cse")[::2], "FILE")


@pytest.mark.parametrize("spec, pass_name", [(QUANTIZE, "quantize"), ("sparsify", "sparsify")])
def test_a_pass_that_needs_data_says_which_and_asks_for_tensors(capsys, mlp, spec, pass_name):
    _, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "-p", f"cse,{spec}")
    line = assert_one_line_error(code, err, f"pass {pass_name!r} needs the data of constant", "--tensors")
    assert out == "" and re.search(r"constant '(model|lm_head)[\w.]*'", line)
    with pytest.raises(TensorDataRequiredError) as info:
        run_pipeline(load_module(ir.read_text()), f"cse,{spec}")
    assert info.value.pass_name == pass_name and info.value.info.name in mlp[0].tensors


def test_outliers_only_annotates_so_it_needs_no_data(capsys, mlp):
    """outliers sets attributes on the linears; their weights' type comes from the text."""
    module, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "-p", "outliers{fraction=0.01}")
    assert code == 0, err
    assert parse_module(out, declared_only=True) == api(module, "outliers{fraction=0.01}")


def test_fold_reads_only_the_constants_it_folds(capsys, tmp_path, mlp):
    """In the MLP every node reads the parameter, so fold needs no data and gives the module
    fold gives with the data; a node of constants only makes it fail rather than skip
    (skipping would print a module that silently differs from the one folded with data)."""
    module, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "-p", "fold")
    assert code == 0 and parse_module(out, declared_only=True) == api(module, "fold")
    fn = module.functions[0]
    weight = next(n for n in fn.nodes if n.op == "constant").outputs[0]
    neg = fn.nodes[0].__class__("neg", (weight.name,), (weight.__class__("negated", weight.type),))
    foldable = module.replace(functions=(fn.replace(nodes=fn.nodes + (neg,), results=fn.results + ("negated",)),))
    text = tmp_path / "foldable.ir"
    text.write_text(print_module(foldable))
    code, out, err = run_cli(capsys, "opt", str(text), "-p", "fold")
    assert_one_line_error(code, err, "pass 'fold' needs the data of constant", "--tensors")
    assert out == ""


def test_tensors_give_the_data_and_new_constants_go_next_to_out(capsys, tmp_path, mlp):
    module, ir, weights = mlp
    out_file = tmp_path / "q.ir"
    code, out, err = run_cli(capsys, "opt", str(ir), "--tensors", str(weights), "-p", f"cse,{QUANTIZE}",
                             "-o", str(out_file))
    assert code == 0 and out == ""
    want = api(module, f"cse,{QUANTIZE}")
    assert out_file.read_text() == print_module(want)
    data = out_file.with_suffix(".safetensors")
    assert f"to {data}" in err and "new" in err
    got = load_module(out_file.read_text(), data)  # every tensor's hash checked on the way in
    assert got == want and not got.tensors.declared()
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    assert_bitwise_equal(evaluate(got, [x]), evaluate(want, [x]))
    assert set(read_safetensors(data, set(want.tensors))) == set(want.tensors)
    assert data.stat().st_mode & 0o777 == out_file.stat().st_mode & 0o777  # not safetensors' own 0600


def test_new_constants_without_out_are_reported_not_written(capsys, tmp_path, mlp):
    module, ir, weights = mlp
    code, out, err = run_cli(capsys, "opt", str(ir), "--tensors", str(weights), "-p", QUANTIZE)
    assert code == 0 and out == print_module(api(module, QUANTIZE))
    assert "not written" in err and f"{UP}.weight.codes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.ir", "mlp.safetensors"]


def test_tensors_hash_mismatch_names_the_tensor(capsys, tmp_path, mlp):
    module, ir, _ = mlp
    arrays = dict(module.tensors)
    arrays[f"{UP}.bias"] = arrays[f"{UP}.bias"] + np.float32(1)
    bad = tmp_path / "bad.safetensors"
    write_safetensors(arrays, bad)
    code, out, err = run_cli(capsys, "opt", str(ir), "--tensors", str(bad), "-p", "cse")
    assert out == ""
    assert_one_line_error(code, err, f"tensor '{UP}.bias' in {bad}", "sha256")


def test_tensors_shape_mismatch_names_the_tensor(capsys, tmp_path, mlp):
    module, ir, _ = mlp
    arrays = dict(module.tensors)
    arrays[f"{UP}.bias"] = arrays[f"{UP}.bias"][:-1]
    bad = tmp_path / "bad.safetensors"
    write_safetensors(arrays, bad)
    assert_one_line_error(*run_cli(capsys, "opt", str(ir), "--tensors", str(bad))[::2], f"'{UP}.bias'", "f32[16]")


def test_not_a_safetensors_file(capsys, mlp):
    _, ir, _ = mlp
    assert_one_line_error(*run_cli(capsys, "opt", str(ir), "--tensors", str(ir))[::2], "safetensors")


def test_out_named_safetensors_is_refused_before_running(capsys, tmp_path, mlp):
    _, ir, weights = mlp
    code, _, err = run_cli(capsys, "opt", str(ir), "--tensors", str(weights), "-p", QUANTIZE,
                           "-o", str(tmp_path / "x.safetensors"))
    assert_one_line_error(code, err, "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_output_reads_back_like_any_ir_text(capsys, mlp):
    """What opt prints (no data) parses with the data given as a TensorTable, as usual."""
    module, ir, _ = mlp
    _, out, _ = run_cli(capsys, "opt", str(ir), "-p", "cse,dce")
    assert parse_module(out, api(module, "cse,dce").tensors) == api(module, "cse,dce")


def test_tensors_file_missing_some_constants_says_so(capsys, tmp_path, mlp):
    module, ir, _ = mlp
    part = tmp_path / "part.safetensors"
    write_safetensors({f"{UP}.bias": module.tensors[f"{UP}.bias"]}, part)
    code, out, err = run_cli(capsys, "opt", str(ir), "--tensors", str(part), "-p", "cse")
    assert code == 0 and out == print_module(api(module, "cse"))
    assert f"{len(module.tensors) - 1} of {len(module.tensors)} constant(s) are not in {part}" in err


def test_no_pass_prints_the_module_back(capsys, mlp):
    module, ir, _ = mlp
    code, out, err = run_cli(capsys, "opt", str(ir))
    assert (code, err) == (0, "") and out == ir.read_text() == print_module(module)


@dataclass(frozen=True)
class ReadsFirstConstant(Pass):
    """Reads a constant and wraps whatever that raises, as a pass's own error handling may."""

    name = "reads-first-constant"

    def apply(self, module: Module) -> Module:
        try:
            module.tensors[next(iter(module.tensors))]
        except Exception as e:
            raise RuntimeError("could not read the weight") from e
        return module


def test_missing_data_is_found_behind_a_pass_own_wrapping(mlp):
    _, ir, _ = mlp
    module = load_module(ir.read_text())
    with pytest.raises(TensorDataRequiredError, match="pass 'reads-first-constant' needs the data") as info:
        run_pipeline(module, [ReadsFirstConstant()])
    assert info.value.info.name == next(iter(module.tensors))
