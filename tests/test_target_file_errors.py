"""Malformed target files (tvm plan.json and stored operands, lut program.json and blobs, cuda
kernel entries) raise ArtifactError naming the file and the field, never KeyError/TypeError.

These files are hash-checked against the manifest before a backend decodes them, so only a
buggy or hostile writer produces them; the decoders must still refuse them precisely.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Callable

import numpy as np
import pytest

from bitsmith.backends.files import target_files
from bitsmith.errors import ArtifactError

pytest.importorskip("tvm")

KEY = "ab" * 32


def _plan_doc() -> dict[str, Any]:
    fn = {"name": "main", "num_slots": 3, "params": [0], "param_types": [[["n", 4], "float32"]], "results": [1],
          "shapes": [["n", 4]], "consts": [{"slot": 2, "tensor": "w"}],
          "steps": [{"call": KEY, "in": [0, 2], "out": [[1, 0, "float32"]]}], "act_dtype": "float32"}
    return {"format": 1, "target": "tvm-llvm", "mcpu": "x86-64-v3", "functions": [fn], "operands": []}


def _load_plan(doc: Any, extra: dict[str, bytes] | None = None) -> None:
    from bitsmith.backends.tvm import llvm_target
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    llvm_target.load_host({"plan.json": raw, **(extra or {})})


def _edit(fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    doc = copy.deepcopy(_plan_doc())
    fn(doc)
    return doc


F0 = lambda d: d["functions"][0]  # noqa: E731


@pytest.mark.parametrize("doc, words", [
    (b"{not json", "not valid JSON"),
    (b'{"format": 1, "format": 1}', "not valid JSON"),
    (b"[1]", "(top level): expected an object"),
    (_edit(lambda d: d.update(target="tvm-cuda")), "not a tvm-llvm plan"),
    (_edit(lambda d: d.pop("functions")), "missing field 'functions'"),
    (_edit(lambda d: d.update(functions={})), "functions: expected a list"),
    (_edit(lambda d: F0(d).pop("steps")), "functions[0]: missing field 'steps'"),
    (_edit(lambda d: F0(d).update(num_slots="3")), "functions[0].num_slots: expected an integer"),
    (_edit(lambda d: F0(d).update(num_slots=-1)), "functions[0].num_slots: -1 is outside"),
    (_edit(lambda d: F0(d)["steps"][0].update(out=[[1, 0]])), "functions[0].steps[0].out[0]: expected 3 items"),
    (_edit(lambda d: F0(d)["steps"][0].update(out=[[1, 0, "object"]])), "out[0][2]"),
    (_edit(lambda d: F0(d)["steps"][0].update({"in": [0, True]})), "functions[0].steps[0].in[1]: expected an integer"),
    (_edit(lambda d: F0(d)["steps"][0].update(call="../../lib")), "functions[0].steps[0].call: bad kernel key"),
    (_edit(lambda d: F0(d)["steps"].append({"view": [0, 1]})), "functions[0].steps[1].view: expected 3 items"),
    (_edit(lambda d: F0(d)["steps"][0].update({"in": [0, 7]})), "functions[0]: slot out of range [0, 3)"),
    (_edit(lambda d: F0(d)["steps"][0].update(out=[[1, 5, "float32"]])), "functions[0]: shape id out of range"),
    (_edit(lambda d: F0(d).update(params=[0, 2])), "functions[0]: 2 params but 1 param_types"),
    (_edit(lambda d: F0(d)["param_types"][0].__setitem__(0, [None])), "param_types[0][0][0]: expected a dim"),
    (_edit(lambda d: F0(d)["consts"].append({"slot": 2, "scalar": ["1", "float32"]})),
     "functions[0].consts[1].scalar[0]: expected a number"),
    (_edit(lambda d: F0(d)["consts"].append({"slot": 2})), "functions[0].consts[1]: missing field 'qlinear'"),
    (_edit(lambda d: d["functions"].append(F0(d))), "functions[1].name: function 'main' appears twice"),
    (_edit(lambda d: d.update(mcpu=5)), "mcpu: expected a string"),
    (_edit(lambda d: d.update(operands={})), "operands: expected a list"),
    (_edit(lambda d: d.update(operands=[{"function": "main"}])), "operands[0]: missing field 'slot'"),
    (_plan_doc(), f"calls kernel {KEY} but kernels/{KEY}.so is not listed"),
])
def test_tvm_plan_json_failures_name_file_and_field(doc, words: str):
    with pytest.raises(ArtifactError) as info:
        _load_plan(doc)
    assert info.value.path == "target/plan.json", info.value
    assert words in info.value.problem, info.value


def test_tvm_plan_json_missing():
    from bitsmith.backends.tvm import llvm_target
    with pytest.raises(ArtifactError, match="missing: a tvm-llvm artifact needs it") as info:
        llvm_target.load_host({})
    assert info.value.path == "target/plan.json"


# --- lut-cpu program.json and its blobs --------------------------------------------------------

@pytest.fixture(scope="module")
def lut_files() -> dict[str, bytes]:
    import bitsmith
    from hf_configs import make_model
    cm = bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32,
                          lut_host="reference")
    return cm.executable.files()


def _program(files: dict[str, bytes], edit: Callable[[dict[str, Any]], Any] | None = None,
             blobs: dict[str, bytes] | None = None) -> None:
    from bitsmith.backends.lut import program
    files = dict(files)
    if edit is not None:
        doc = json.loads(files[program.INDEX_FILE])
        edit(doc)
        files[program.INDEX_FILE] = json.dumps(doc).encode()
    files.update(blobs or {})
    program.from_files(files)


L0 = lambda d: d["layers"][0]  # noqa: E731


@pytest.mark.parametrize("edit, file, words", [
    (lambda d: d.pop("layers"), "lut/program.json", "(top level): missing field 'layers'"),
    (lambda d: d.update(layers={}), "lut/program.json", "layers: expected a list"),
    (lambda d: d.update(version=99), "lut/program.json", "not a bitsmith-lut-program v1 index"),
    (lambda d: L0(d).update(stream="0:10"), "lut/program.json", "layers[0].stream: expected a list"),
    (lambda d: L0(d).update(stream=[0]), "lut/program.json", "layers[0].stream: expected 2 items"),
    (lambda d: L0(d).update(weights=[0, None]), "lut/program.json", "layers[0].weights[1]: expected an integer"),
    (lambda d: L0(d).update(params=[-4, 4]), "lut/program.json", "layers[0].params[0]: -4 is outside"),
    (lambda d: L0(d).update(stream=[0, 1 << 40]), "lut/program.json", "layers[0].stream: byte range"),
    (lambda d: L0(d).update(stream=[4, 32]), "lut/program.json", "layers[0].stream: byte range [4, 36) is not whole"),
    (lambda d: L0(d).update(stream=[8, 32]), "lut/program.json", "layers[0].stream: not a LUT instruction stream"),
    (lambda d: L0(d).update(in_features="64"), "lut/program.json", "layers[0].in_features: expected an integer"),
    (lambda d: L0(d).update(in_features=1 << 20), "lut/program.json", "layers[0].in_features: 1048576 is more"),
    (lambda d: L0(d).pop("function"), "lut/program.json", "layers[0]: missing field 'function'"),
    (lambda d: d["layers"].append(L0(d)), "lut/program.json", "has two streams"),
])
def test_lut_program_json_failures_name_file_and_field(lut_files, edit, file: str, words: str):
    with pytest.raises(ArtifactError) as info:
        _program(lut_files, edit)
    assert info.value.path == f"target/{file}", info.value
    assert words in info.value.problem, info.value


@pytest.mark.parametrize("name, words", [
    ("lut/streams.bin", "is not a whole number of uint64 items"),
    ("lut/params.bin", "is not a whole number of float32 items"),
])
def test_lut_blob_of_partial_items(lut_files, name: str, words: str):
    with pytest.raises(ArtifactError, match=words) as info:
        _program(lut_files, blobs={name: lut_files[name] + b"\0"})
    assert info.value.path == f"target/{name}"


def test_lut_missing_blob(lut_files):
    from bitsmith.backends.lut import program
    files = {k: v for k, v in lut_files.items() if k != "lut/weights.bin"}
    with pytest.raises(ArtifactError, match="missing from the artifact") as info:
        program.from_files(files)
    assert info.value.path == "target/lut/weights.bin"


def test_lut_blobs_are_read_into_aligned_read_only_arrays(lut_files):
    from bitsmith.backends.lut import program
    layers, _ = program.from_files(target_files(lut_files))
    p = layers[0].program
    for a in (p.stream, p.weights, p.params):
        assert not a.flags.writeable
    assert p.stream.ctypes.data % 8 == 0 and np.shares_memory(layers[0].program.stream, layers[1].program.stream) is False


# --- tvm-cuda kernel entries (decoded without a GPU) ----------------------------------------------

def _cuda_doc(**kernel: Any) -> dict[str, Any]:
    doc = _plan_doc()
    doc["target"] = "tvm-cuda"
    doc["kernels"] = [{"key": KEY, "functions": ["main"], "scratch": [], "source_sha256": "0" * 64, **kernel}]
    doc["nvcc"] = {"mode": "skip", "flags": []}  # source only: no fatbin/ptx expected
    return doc


@pytest.mark.parametrize("doc, extra, words", [
    ({**_cuda_doc(), "kernels": {}}, {}, "kernels: expected a list"),
    (_cuda_doc(key=5), {}, "kernels[0].key: bad kernel key"),
    (_cuda_doc(functions="main"), {}, "kernels[0].functions: expected a list"),
    (_cuda_doc(scratch=[{"dims": "x"}]), {}, "kernels[0].scratch[0]: malformed scratch spec"),
    (_cuda_doc(), {}, f"kernels[0].key: kernel {KEY} is listed but kernels/{KEY}.so is not in the artifact"),
    (_cuda_doc(), {f"kernels/{KEY}.so": b"", f"kernels/{KEY}.cu": b"x"}, "kernels[0].source_sha256: "),
    ({**_cuda_doc(), "nvcc": {"mode": "required", "flags": []}}, {f"kernels/{KEY}.so": b"", f"kernels/{KEY}.cu": b"x"},
     f"kernels[0].key: kernel {KEY} is listed but kernels/{KEY}.fatbin is not in the artifact"),
    ({**_cuda_doc(), "nvcc": {"mode": "maybe", "flags": []}}, {}, "nvcc.mode: "),
    ({**_cuda_doc(), "nvcc": {"mode": "skip", "flags": [3]}}, {}, "nvcc.flags[0]: expected a string"),
])
def test_tvm_cuda_plan_failures_name_file_and_field(doc, extra, words: str):
    from bitsmith.backends.tvm import cuda_target
    from bitsmith.ir import GraphBuilder
    module = GraphBuilder().module([], {})
    files = {"plan.json": json.dumps(doc).encode(), **extra}
    with pytest.raises(ArtifactError) as info:
        cuda_target.load(module, {}, files)
    assert info.value.path == "target/plan.json", info.value
    assert words in info.value.problem, info.value
