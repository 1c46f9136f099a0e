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


def _expect_plan_refusal(doc: Any, words: str) -> None:
    """Loading ``doc`` as tvm-llvm's plan.json is an ArtifactError naming that file and ``words``."""
    with pytest.raises(ArtifactError) as info:
        _load_plan(doc)
    assert info.value.path == "target/plan.json", info.value
    assert words in info.value.problem, info.value


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
    # an instruction-set record naming a flag no build records / an unknown arch: damaged, not foreign
    (_edit(lambda d: d.update(isa={"kind": "k", "arch": "x86_64", "cpu": "c", "features": ["avx2", "bmi0"]})),
     "isa: features: bmi0 is not among the cpuinfo flags"),
    (_edit(lambda d: d.update(isa={"kind": "k", "arch": "x86_60", "cpu": "c", "features": []})), "isa: arch: 'x86_60'"),
    (_edit(lambda d: d.update(operands={})), "operands: expected a list"),
    (_edit(lambda d: d.update(operands=[{"function": "main"}])), "operands[0]: missing field 'slot'"),
    (_plan_doc(), f"calls kernel {KEY} but kernels/{KEY}.so is not listed"),
    (_edit(lambda d: d.update(kv_inplace_last=[F0(d)])), "kv_inplace_last: needs the in-place variant"),
    (_edit(lambda d: d.update(kv_inplace_last=[{**F0(d), "name": "other"}])), "kv_inplace_last: a variant of 'other'"),
])
def test_tvm_plan_json_failures_name_file_and_field(doc, words: str):
    _expect_plan_refusal(doc, words)


def test_tvm_plan_json_missing():
    from bitsmith.backends.tvm import llvm_target
    with pytest.raises(ArtifactError, match="missing: a tvm-llvm artifact needs it") as info:
        llvm_target.load_host({})
    assert info.value.path == "target/plan.json"


# --- lut-cpu program.json and its blobs --------------------------------------------------------

@pytest.fixture(scope="module")
def lut_files() -> dict[str, bytes]:
    import bitsmith
    from bitsmith.testing.hf_configs import make_model
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
    (lambda d: L0(d).update(stream=[8, 32]), "lut/program.json", "layers[0].stream: byte range starts at 8, but"),
    (lambda d: d["layers"][1]["weights"].__setitem__(0, 0), "lut/program.json", "layers[1].weights: byte range starts at 0"),
    (lambda d: d["layers"].pop(), "lut/program.json", "layers: the layers' stream ranges cover"),
    (lambda d: L0(d).update(in_features="64"), "lut/program.json", "layers[0].in_features: expected an integer"),
    (lambda d: L0(d).update(in_features=1 << 20), "lut/program.json", "layers[0].in_features: 1048576 is more"),
    (lambda d: L0(d).pop("function"), "lut/program.json", "layers[0]: missing field 'function'"),
    (lambda d: d["layers"][1].update(function=L0(d)["function"], value=L0(d)["value"]), "lut/program.json",
     "has two streams"),
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


def test_lut_stream_of_a_bad_header(lut_files):
    words = np.frombuffer(lut_files["lut/streams.bin"], "<u8").copy()
    words[0] ^= 1  # the first layer's magic
    with pytest.raises(ArtifactError, match=r"layers\[0\]\.stream: not a LUT instruction stream") as info:
        _program(lut_files, blobs={"lut/streams.bin": words.tobytes()})
    assert info.value.path == "target/lut/program.json"


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


# --- values that decoded once but failed when the executor was built or first run -------------------
# Each used to pass decoding and raise SymbolicDimError / IRTypeError / OverflowError / IndexError /
# BitsmithError / StreamError later; now refused at load, naming the file and the field.

@pytest.mark.parametrize("doc, words", [
    (_edit(lambda d: F0(d)["shapes"][0].__setitem__(0, "((")), "functions[0].shapes[0][0]: bad character '('"),
    (_edit(lambda d: F0(d)["shapes"][0].__setitem__(0, "n+")), "functions[0].shapes[0][0]: malformed dimension"),
    (_edit(lambda d: F0(d)["param_types"][0][0].__setitem__(0, "n**2")), "param_types[0][0][0]: malformed"),
    (_edit(lambda d: F0(d)["shapes"][0].__setitem__(1, -4)), "functions[0].shapes[0][1]: -4 is outside"),
    (_edit(lambda d: F0(d)["shapes"][0].__setitem__(0, "m*n")), "shapes: dim 'm*n' uses symbols ['m']"),
    (_edit(lambda d: F0(d)["steps"][0].update(out=[[1, 0, "float8"]])), "out[0][2]: \"float8\" is not one of"),
    (_edit(lambda d: F0(d)["steps"][0].update(out=[[1, 0, "uint16"]])), "out[0][2]: \"uint16\" is not one of"),
    (_edit(lambda d: F0(d)["param_types"][0].__setitem__(1, "int16")), "param_types[0][1]: \"int16\" is not one"),
    (_edit(lambda d: F0(d)["consts"].append({"slot": 2, "scalar": [300, "int8"]})),
     "functions[0].consts[1].scalar[0]: 300 does not fit dtype int8"),
    (_edit(lambda d: F0(d)["consts"].append({"slot": 2, "qlinear": "q", "index": 10 ** 6})),
     "functions[0].consts[1].index: 1000000 is outside"),
    (_edit(lambda d: F0(d)["steps"][0].update({"in": [0, 1]})), "functions[0]: steps[0] reads slot 1 before"),
    (_edit(lambda d: (F0(d).update(num_slots=4, results=[3]))), "functions[0]: result slot 3 is never defined"),
    (_edit(lambda d: (F0(d).update(num_slots=4), F0(d)["shapes"].append(["n", 5]),
                      F0(d)["steps"].append({"view": [1, 3, 1]}))), "steps[1].view: shape ['n', 5] does not have"),
])
def test_tvm_plan_values_that_would_fail_later_fail_at_load(doc, words: str):
    _expect_plan_refusal(doc, words)


def test_plan_views_of_equal_size_still_decode():
    """The view check compares element counts as polynomials: [n, 4] -> [4*n] is accepted."""
    from bitsmith.backends.tvm.plan import FunctionPlan
    doc = _edit(lambda d: (F0(d).update(num_slots=4), F0(d)["shapes"].append(["4*n"]),
                           F0(d)["steps"].append({"view": [1, 3, 1]})))
    plan = FunctionPlan.from_json(F0(doc))
    assert plan.slot_types()[3] == (["4*n"], "float32")


@pytest.fixture(scope="module")
def llvm_model():
    """A quantized tiny Llama on tvm-llvm: its plan has tensor, scalar and qlinear-operand constants."""
    import bitsmith
    from bitsmith.testing.hf_configs import make_model
    return bitsmith.compile(make_model("llama"), target="tvm-llvm", quant="rtn-int4", group_size=32)


def _load_llvm(cm, edit: Callable[[dict[str, Any]], Any]) -> None:
    from bitsmith.backends.tvm import llvm_target
    files = dict(cm.executable.files())
    doc = json.loads(files["plan.json"])
    edit(doc)
    files["plan.json"] = json.dumps(doc).encode()
    llvm_target.load(cm.module, cm.options, target_files(files))


def _first(doc: dict[str, Any], pick: Callable[[dict[str, Any]], bool], key: str) -> dict[str, Any]:
    return next(x for f in doc["functions"] for x in f[key] if pick(x))


def test_llvm_unedited_plan_loads(llvm_model):
    _load_llvm(llvm_model, lambda d: None)


@pytest.mark.parametrize("edit, words", [
    # stored operands are re-derived when absent, so the index reaches resolve_consts
    (lambda d: (d.update(operands=[]), _first(d, lambda c: "qlinear" in c, "consts").update(index=15)),
     "consts: operand index 15 of qlinear"),
    (lambda d: d["functions"][0]["steps"].append({"call": "extern:lut/0", "in": d["functions"][0]["params"][:1],
                                                  "out": [[d["functions"][0]["params"][0], 0, "float32"]]}),
     "call: kernel extern:lut/0 is an unknown extern"),
    (lambda d: d["functions"][0]["param_types"][0].__setitem__(1, "int32"),
     "param_types[0]: [\"batch\", \"seq\"] int32 is not the IR's"),
    (lambda d: d["functions"][0]["param_types"][0][0].__setitem__(1, 7), "does not have the ['batch', 7] elements"),
    (lambda d: d["functions"][0]["param_types"][0][0].append(1), "[\"batch\", \"seq\", 1] int64 is not the IR's"),
    (lambda d: (d.update(operands=[]), d["functions"][0].update(name="nope")), "the module has no function 'nope'"),
])
def test_llvm_plan_that_does_not_fit_the_module(llvm_model, edit, words: str):
    with pytest.raises(ArtifactError) as info:
        _load_llvm(llvm_model, edit)
    assert info.value.path == "target/plan.json", info.value
    assert words.replace('"', "'") in info.value.problem.replace('"', "'"), info.value


@pytest.mark.parametrize("edit, words", [
    (lambda e: e.update(shape=e["shape"][::-1] if len(set(e["shape"])) > 1 else e["shape"] + [1]),
     "operands: stored operand for 'main' slot"),
    (lambda e: e.update(dtype="int8" if e["dtype"] != "int8" else "uint8"), "operands: stored operand for 'main' slot"),
])
def test_llvm_stored_operand_of_the_wrong_shape(llvm_model, edit, words: str):
    def change(d):
        assert d["operands"], "the fixture's plan stores qlinear operands"
        edit(d["operands"][0])
    with pytest.raises(ArtifactError) as info:
        _load_llvm(llvm_model, change)
    assert info.value.path == "target/plan.json", info.value
    assert words in info.value.problem, info.value


@pytest.fixture(scope="module")
def lut_tvm_model():
    import bitsmith
    from bitsmith.testing.hf_configs import make_model
    return bitsmith.compile(make_model("llama"), target="lut-cpu", quant="rtn-int4", group_size=32,
                            lut_host="tvm-llvm")


def _load_lut(cm, files: dict[str, bytes]) -> None:
    from bitsmith.backends.lut import LUTBackend
    LUTBackend().load(cm.module, "lut-cpu", cm.options, target_files(files))


def test_lut_unknown_extern_kernel(lut_tvm_model):
    files = dict(lut_tvm_model.executable.files())
    doc = json.loads(files["host/plan.json"])
    _first(doc, lambda s: s.get("call", "").startswith("extern:"), "steps").update(call="extern:lut/999")
    files["host/plan.json"] = json.dumps(doc).encode()
    with pytest.raises(ArtifactError, match="calls extern:lut/999, which has no LUT program") as info:
        _load_lut(lut_tvm_model, files)
    assert info.value.path == "target/host/plan.json"


@pytest.mark.parametrize("executor", ["auto", "reference"])
# last word END -> SYNC or an unknown opcode; an END before the last word; the first body word unknown
@pytest.mark.parametrize("word, value", [(-1, 0x02), (-1, 0xFF), (-2, 0x00), (4, 0xFF)])
def test_lut_bad_stream_is_refused_at_load(lut_tvm_model, executor: str, word: int, value: int):
    """A stream whose header parses but whose body the validator refuses (formerly: StreamError on
    the first call) fails at load, naming layers[i].stream, with the fast and the reference executor."""
    from bitsmith.backends.lut import program, validate
    files = dict(lut_tvm_model.executable.files())
    index = json.loads(files[program.INDEX_FILE])
    off, size = index["layers"][1]["stream"]
    words = np.frombuffer(files["lut/streams.bin"], "<u8").copy()
    i = off // 8 + (size // 8 + word if word < 0 else word)
    words[i] = (int(words[i]) & ~0xFF) | value
    files["lut/streams.bin"] = words.tobytes()
    layers, _ = program.from_files(target_files(files))  # the header still parses
    with pytest.raises(validate.StreamError):
        validate.check_program(layers[1].program)  # the oracle: the reference validator refuses it
    with pytest.raises(ArtifactError, match=r"layers\[1\]\.stream: LUT executor refused the stream") as info:
        _load_lut(lut_tvm_model, files) if executor == "auto" else _load_lut_with(lut_tvm_model, files, executor)
    assert info.value.path == "target/lut/program.json"


def _load_lut_with(cm, files: dict[str, bytes], executor: str) -> None:
    from bitsmith.backends.lut import LUTBackend
    LUTBackend().load(cm.module, "lut-cpu", {**cm.options, "lut_executor": executor}, target_files(files))


def test_lut_unedited_files_load(lut_tvm_model):
    _load_lut(lut_tvm_model, dict(lut_tvm_model.executable.files()))


@pytest.mark.parametrize("kw", [dict(quant="rtn-int4", group_size=32),
                                dict(quant="bitmod-w3", group_size=32, outliers=0.01),
                                dict(quant="rtn-int4", group_size=32, sparsity="2:4")])
def test_operand_specs_are_the_derived_operands_shapes(kw):
    """The load-time check of stored operands compares with ``operand_specs``; the oracle is the
    derivation itself (``qlinear_operands``) on every qlinear of a quantized model."""
    import bitsmith
    from bitsmith.testing.hf_configs import make_model
    from bitsmith.backends.tvm.qlinear_layout import native_scheme_llvm, operand_specs, qlinear_operands
    from bitsmith.ir.quant_grids import get_scheme
    cm = bitsmith.compile(make_model("llama"), target="reference", **kw)
    seen = 0
    for fn in cm.module.functions:
        producers = fn.producers()
        for node in fn.nodes:
            # every qlinear tvm-llvm runs as a kernel (the default rtn-int8 lm_head included)
            if node.op != "qlinear" or not native_scheme_llvm(get_scheme(node.attr("scheme"))):
                continue
            arrays = [cm.module.tensors[producers[i].attr("name")] for i in node.inputs[1:]]
            got = qlinear_operands(node.attr_dict, arrays, "float32")
            assert operand_specs(node.attr_dict, arrays, "float32") == [(a.shape, a.dtype.name) for a in got]
            seen += 1
    assert seen


@pytest.mark.parametrize("scratch, words", [
    ({"position": 0, "dims": [4], "dtype": "float32"}, "kernels[0].scratch[0].position: 0 is not after the 2 inputs"),
    ({"position": 2, "dims": [[5, 0]], "dtype": "float32"}, "kernels[0].scratch[0].dims[0]: (5, 0) is not an axis"),
    ({"position": 2, "dims": [[0, 2]], "dtype": "float32"}, "kernels[0].scratch[0].dims[0]: (0, 2) is not an axis"),
    ({"position": 2, "dims": [-3], "dtype": "float32"}, "kernels[0].scratch[0].dims[0]: -3 is outside"),
    ({"position": 2, "dims": [4], "dtype": "float8"}, "kernels[0].scratch[0].dtype: \"float8\" is not one of"),
    (None, "functions['main']: 1 params and 1 results, but the IR function has 0 and 0"),  # the plan meets the IR
])
def test_tvm_cuda_scratch_and_signature_checked_at_load(scratch, words: str):
    """Scratch specs and the plan's signature used to be checked only on the first GPU run
    (IndexError / KeyError there); now at load, without a GPU."""
    from bitsmith.backends.tvm import cuda_target
    from bitsmith.ir import GraphBuilder
    source = "// kernel"
    doc = _cuda_doc(scratch=[scratch] if scratch else [], source_sha256=cuda_target.source_digest(source))
    files = {"plan.json": json.dumps(doc).encode(), f"kernels/{KEY}.so": b"", f"kernels/{KEY}.cu": source.encode()}
    with pytest.raises(ArtifactError) as info:
        cuda_target.load(GraphBuilder().module([], {}), {}, files)
    assert info.value.path == "target/plan.json", info.value
    assert words in info.value.problem, info.value
