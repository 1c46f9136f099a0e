"""Target tvm-cuda: scheduling, fp16 rewrite, nvcc builds, artifacts; numerics on a GPU.

Without a GPU (CI): every kernel of a tiny Llama compiles to CUDA and nvcc builds its PTX and
fatbin; quantized kernels of every scheme schedule without a dense weight; the fp16 module
matches the float32 one on the reference interpreter; artifacts keep source + PTX and run()
says a GPU is needed. Slow: every distinct kernel of SmolLM2-135M (fp16, bitmod-w4,
bitmod-w3) compiles with nvcc. gpu-marked: logits of tiny Llama/GPT-2/Qwen2 (dense and
quantized) and every quantized kernel case against the oracle, from prebuilt cases
(``BITSMITH_CUDA_PREBUILT``, see cuda_cases.py and benchmarks/gpu_check.sh) or built here.
Tolerances are stated and justified in cuda_cases.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

tvm = pytest.importorskip("tvm")

import bitsmith  # noqa: E402
from bitsmith.backends.tvm.cuda_runtime import NO_GPU, gpu_available  # noqa: E402
from bitsmith.backends.tvm.cuda_scratch import ScratchSpec  # noqa: E402
from bitsmith.errors import ArtifactError, BitsmithError  # noqa: E402
from bitsmith.backends.tvm.qlinear_layout import native_scheme  # noqa: E402
from bitsmith.ir.quant_grids import fitted_schemes  # noqa: E402

import cuda_cases  # noqa: E402

HAS_NVCC = shutil.which("nvcc") is not None


def _has_compiler() -> bool:
    try:
        from tvm.s_tir import dlight  # noqa: F401 - needs TVM's compiler library
        return True
    except Exception:  # noqa: BLE001
        return False


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="TVM compiler library not available")


@pytest.fixture(scope="module")
def tiny_llama_cuda():
    """Tiny Llama for tvm-cuda: with nvcc where it is on PATH, else explicitly without (nvcc="skip")."""
    from bitsmith.testing.hf_configs import make_model
    return bitsmith.compile(make_model("llama"), target="tvm-cuda", **({} if HAS_NVCC else {"nvcc": "skip"}))


def _plain_mlp():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return model, (torch.randn(2, 8),)


# ---------------------------------------------------------------- CPU-only tests

def test_option_defaults_and_bad_options():
    from bitsmith.backends.tvm import TVMBackend
    assert TVMBackend().option_defaults("tvm-cuda") == {"arch": "sm_90", "act_dtype": "float16", "nvcc": "required"}
    from bitsmith.backends.tvm.cuda_target import _options, nvcc_mode
    with pytest.raises(BitsmithError, match="arch"):
        _options({"arch": "cuda -arch=sm_90"})
    with pytest.raises(BitsmithError, match="act_dtype"):
        _options({"act_dtype": "bfloat16"})
    with pytest.raises(BitsmithError, match="option nvcc must be one of"):
        nvcc_mode({"nvcc": "auto"})


@needs_compiler
def test_missing_nvcc_fails_at_compile_time_unless_skipped(monkeypatch, tmp_path):
    """No nvcc (its lookup patched away) is a compile error naming the opt-out; with
    nvcc="skip" the artifact ships source only and plan.json says the runtime compiles it."""
    from bitsmith.backends.tvm import cuda_build, cuda_target
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.schedule_cuda import cuda_target as make_target
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    model, example = _plain_mlp()
    with pytest.raises(cuda_build.NvccMissingError, match="nvcc not found on PATH.*nvcc='skip'"):
        bitsmith.compile(model, target="tvm-cuda", example_inputs=example)
    attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(0), "rtn-int4", 64, 16, 32, "", 0.0, False)
    kdef = qlinear_kernel(attrs, qlinear_operands(attrs, arrays, "float16"), "float16")
    with pytest.raises(cuda_build.NvccMissingError):  # the compiler itself never drops nvcc silently
        cuda_build.CudaCompiler(make_target(), directory=tmp_path).compile(kdef)

    cm = bitsmith.compile(model, target="tvm-cuda", example_inputs=example, nvcc="skip")
    files = cm.executable.files()
    assert any(n.endswith(".cu") for n in files) and not any(n.endswith((".fatbin", ".ptx")) for n in files)
    record = json.loads(files["plan.json"])["nvcc"]
    assert record == {"mode": "skip", "flags": [], "runtime_compiler": cuda_target.RUNTIME_COMPILER}
    assert cm.report()["executable"]["nvcc"] == record and cm.report()["options"]["nvcc"] == "skip"
    cm.save(str(tmp_path / "a"))
    assert bitsmith.load(str(tmp_path / "a")).report()["executable"]["nvcc"] == record

    # plan.json claiming nvcc built every kernel while fatbins are missing, or a malformed record
    plan = json.loads(files["plan.json"])
    for bad, message in ((dict(plan, nvcc={"mode": "required", "flags": []}),
                          r"\.fatbin is not in the artifact \(nvcc mode 'required'\)"),
                         (dict(plan, nvcc={"mode": "maybe", "flags": []}), r'nvcc\.mode: "maybe" is not one of'),
                         ({k: v for k, v in plan.items() if k != "nvcc"}, "missing field 'nvcc'")):
        with pytest.raises(ArtifactError, match=message):
            cuda_target.load(cm.module, cm.options, {**files, "plan.json": json.dumps(bad).encode()})


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not on PATH")
def test_recorded_nvcc_flags_are_the_flags_nvcc_runs_with(monkeypatch):
    import subprocess
    from bitsmith.backends.tvm import cuda_build
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    target = cuda_target("sm_90")
    commands = []
    real_run = subprocess.run
    monkeypatch.setattr(cuda_build.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or real_run(cmd, **kw))
    fatbin, ptx, _ = cuda_build.nvcc_compile('extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }',
                                             target)
    flags = cuda_build.nvcc_flags(target)
    assert flags[-1] == "-gencode=arch=compute_90,code=[sm_90,compute_90]"
    assert len(commands) == 1 and commands[0][1:1 + len(flags)] == flags
    assert fatbin and ".target sm_90" in ptx


@pytest.mark.parametrize("arch,quant", [("llama", None), ("gpt2", None), ("qwen2", None), ("llama", "bitmod-w4")])
def test_half_module_matches_fp32(arch, quant):
    """The fp16 rewrite on the reference interpreter stays within 2e-3 of the float32 module
    relative to max|logit| (fp16 rounding 4.9e-4 per kernel boundary, a few dozen of them
    on a 2-layer model, mostly cancelling); a dtype mistake in the rewrite would fail the
    verifier or move logits by O(max|logit|)."""
    from bitsmith.testing.hf_configs import VOCAB, make_model
    from bitsmith.passes.half_precision import to_half
    from bitsmith.ir import run_function, verify_module
    kw = {"quant": quant, "group_size": 32} if quant else {}
    cm = bitsmith.compile(make_model(arch), target="reference", **kw)
    half = verify_module(to_half(cm.module))
    fn = half.function("main")
    assert all(p.type.dtype != "float32" for p in fn.params)
    assert all(t.dtype != "float32" for t in half.function("main").result_types())
    for args in cuda_cases._model_inputs(cm.module, np.random.default_rng(0), VOCAB):
        ref = run_function(cm.module, "main", args)[0]
        got = run_function(half, "main", [a.astype(np.float16) if a.dtype == np.float32 else a for a in args])[0]
        assert np.abs(got.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_half_keeps_rotary_angles_in_float32():
    from bitsmith.testing.hf_configs import make_model
    from bitsmith.passes.half_precision import to_half
    cm = bitsmith.compile(make_model("llama"), target="reference")
    fn = to_half(cm.module).function("main")
    cos = [n for n in fn.nodes if n.op == "cos"]
    assert cos and all(n.output.type.dtype == "float32" for n in cos)
    assert all(n.output.type.dtype == "float32" for n in fn.nodes if n.op in ("pow", "mean", "rsqrt"))


@needs_compiler
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not on PATH")
def test_every_kernel_of_tiny_llama_builds_ptx_with_nvcc(tiny_llama_cuda):
    exe = tiny_llama_cuda.executable
    files = exe.files()
    plan = json.loads(files["plan.json"])
    keys = [k["key"] for k in plan["kernels"]]
    assert len(keys) == exe.report()["kernels"] >= 10
    for meta in plan["kernels"]:
        key = meta["key"]
        src = files[f"kernels/{key}.cu"].decode()
        ptx = files[f"kernels/{key}.ptx"].decode()
        assert files[f"kernels/{key}.fatbin"]
        assert "__global__" in src
        assert ".target sm_90" in ptx
        for fn in meta["functions"]:
            assert f".entry {fn}_kernel" in ptx or f".entry {fn}_kernel0" in ptx
    report = exe.report()
    assert report["arch"] == "sm_90" and report["act_dtype"] == "float16"
    from bitsmith.backends.tvm.cuda_build import nvcc_flags
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    assert report["nvcc"] == plan["nvcc"] == {"mode": "required", "flags": nvcc_flags(cuda_target("sm_90"))}
    assert report["ptx_bytes"] > 0 and report["nvcc_seconds"] >= 0


def _tamper_and_load(artifact: Path, suffix: str) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    names = sorted(n for n in manifest["files"] if n.endswith(suffix))
    assert names, f"the artifact lists its {suffix} files with their sha256"
    victim = artifact / names[0]
    original = victim.read_bytes()
    victim.write_bytes(original + b"// tampered")
    with pytest.raises(ArtifactError, match=suffix.replace(".", r"\.")):
        bitsmith.load(str(artifact))
    victim.write_bytes(original)


@needs_compiler
def test_artifact_roundtrip_keeps_every_kernel_file(tiny_llama_cuda, tmp_path):
    """Independent of nvcc: the loaded executable holds the same files, a tampered CUDA source
    is refused, and without a GPU running is a clear error."""
    cm = tiny_llama_cuda
    cm.save(str(tmp_path / "a"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    assert loaded.target == "tvm-cuda"
    assert loaded.executable.files() == cm.executable.files()
    assert loaded.executable.report()["loaded_from_artifact"]
    if not gpu_available():
        with pytest.raises(BitsmithError, match=NO_GPU):
            loaded(np.zeros((1, 4), np.int64))
    _tamper_and_load(tmp_path / "a", ".cu")


@needs_compiler
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not on PATH: the artifact has no PTX to keep")
def test_artifact_roundtrip_keeps_source_and_ptx(tiny_llama_cuda, tmp_path):
    cm = tiny_llama_cuda
    cm.save(str(tmp_path / "a"))
    loaded = bitsmith.load(str(tmp_path / "a"))
    names = [n for n in cm.executable.files() if n.endswith((".cu", ".ptx", ".fatbin"))]
    assert {n.rsplit(".", 1)[1] for n in names} == {"cu", "ptx", "fatbin"}
    assert all(loaded.executable.files()[n] == cm.executable.files()[n] for n in names)
    _tamper_and_load(tmp_path / "a", ".ptx")


def test_run_without_gpu_is_a_clear_error(tiny_llama_cuda):
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BitsmithError, match="tvm-cuda needs a CUDA GPU; none found"):
        tiny_llama_cuda(np.zeros((1, 3), np.int64))


@needs_compiler
@pytest.mark.parametrize("case", ["rtn-int4", "bitmod-w3", "bitmod-w4-ol-bias", "bitmod-w3-2of4", "rtn-int4-4of8-ol"])
def test_quantized_kernels_read_only_packed_operands(case, tmp_path):
    """CUDA kernels cannot allocate global memory (TVM's codegen refuses), so a kernel that
    compiles holds no dense weight outside registers/shared tiles; its parameters are the
    activations, the packed operands and the output, none of them a float [out, in]."""
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(3), *cuda_cases.QKERNEL_CASES[case])
    ops = qlinear_operands(attrs, arrays, "float16")
    kdef = qlinear_kernel(attrs, ops, "float16")
    dense = (attrs["out_features"], attrs["in_features"])
    for p in kdef.func.params[1:-1]:
        assert not (tuple(int(d) for d in p.shape) == dense and "float" in str(p.dtype))
    k = CudaCompiler(cuda_target(), use_nvcc=False, directory=tmp_path).compile(kdef)
    # every row regime; a kernel with outlier corrections (two reductions) has no GEMV: its
    # tensor-core functions serve every m
    assert k.functions == (("main", "main_small") if attrs["outliers"] else ("main", "main_gemv", "main_small"))
    assert "__global__" in k.source


@needs_compiler
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(sorted(n for n, s in fitted_schemes().items() if native_scheme(s))),
       k=st.integers(2, 12).map(lambda v: 32 * v),
       n=st.integers(1, 6).map(lambda v: 16 * v), group=st.sampled_from([32, 64, 128]))
def test_quantized_kernels_schedule_for_any_shape(scheme, k, n, group, tmp_path):
    """Random shapes, group sizes and bit widths schedule on every CUDA path (GEMV for few
    rows, tensor cores otherwise) and compile to CUDA C; numerics are the gpu tests'."""
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(k * n), scheme, k, n, group, "", 0.0, False)
    kdef = qlinear_kernel(attrs, qlinear_operands(attrs, arrays, "float16"), "float16")
    kernel = CudaCompiler(cuda_target(), use_nvcc=False, directory=tmp_path).compile(kdef)
    assert "main_gemv_kernel" in kernel.source and "mma.sync.aligned.m16n8k16" in kernel.source


@pytest.mark.parametrize("arch,quant", [("llama", None), ("qwen2", "bitmod-w4")])
def test_device_executor_matches_llvm_executor_on_cpu(arch, quant):
    """The GPU executor's plan logic (symbol binding, views, pooled intermediates, uploaded
    and derived constants, KV-cache inputs) runs unchanged on TVM's CPU device with the
    tvm-llvm kernels of the same plan; it must reproduce that target's outputs exactly."""
    from bitsmith.testing.hf_configs import VOCAB, make_model
    from bitsmith.backends.tvm import llvm_target, runtime_cpu
    from bitsmith.backends.tvm.cuda_runtime import CudaPlanExecutor, DeviceKernel
    kw = {"quant": quant, "group_size": 32} if quant else {}
    cm = bitsmith.compile(make_model(arch), target="tvm-llvm", **kw)
    exe = cm.executable
    libdir = runtime_cpu.LibraryDir()
    kernels = {k: DeviceKernel(libdir.load(k, data), ()) for k, data in exe.libraries.items()}
    plan = exe.plans["main"]
    device_exec = CudaPlanExecutor(plan, kernels, llvm_target.resolve_consts(cm.module, plan), tvm.cpu())
    for args in cuda_cases._model_inputs(cm.module, np.random.default_rng(0), VOCAB):
        for got, ref in zip(device_exec.run(args), exe.run("main", args)):
            np.testing.assert_array_equal(got, ref)


def test_scratch_spec_json_roundtrip_and_refusal():
    spec = ScratchSpec(3, (2, (0, 1), (1, 2)), "float32")
    assert ScratchSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    a, b = np.zeros((5, 7)), np.zeros((1, 2, 9))
    assert spec.shape([a, b]) == (2, 7, 9)
    with pytest.raises(BitsmithError):
        ScratchSpec.from_json({"position": 1, "dtype": "float32", "dims": ["__import__('os')"]})


# ---------------------------------------------------------------- slow: SmolLM2

@pytest.mark.slow
@needs_compiler
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not on PATH")
@pytest.mark.parametrize("quant", [None, "bitmod-w4", "bitmod-w3"])
def test_smollm2_every_kernel_compiles_with_nvcc(smollm2, quant):
    model, _ = smollm2
    kw = {"quant": quant} if quant else {}
    cm = bitsmith.compile(model, target="tvm-cuda", **kw)
    files = cm.executable.files()
    plan = json.loads(files["plan.json"])
    assert plan["kernels"]
    for meta in plan["kernels"]:
        ptx = files[f"kernels/{meta['key']}.ptx"].decode()
        assert ".target sm_90" in ptx and ".entry main_kernel" in ptx, meta["name"]
    kinds = {m["kind"] for m in plan["kernels"]}
    assert ("qgemv" if quant else "gemv") in kinds and "flash-attention" in kinds


# ---------------------------------------------------------------- gpu: numerics

# Cases from BITSMITH_CUDA_PREBUILT were built on another machine (benchmarks/gpu_check.sh):
# their kernel libraries are not in this machine's trust store, so the checks trust them
# explicitly; cases built here are trusted through the store that saving filled.
BUILT_ELSEWHERE = bool(os.environ.get("BITSMITH_CUDA_PREBUILT"))


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory) -> Path:
    if not gpu_available():
        pytest.skip("needs a CUDA GPU")
    env = os.environ.get("BITSMITH_CUDA_PREBUILT")
    if env:
        return Path(env)
    if not _has_compiler():
        pytest.skip("no prebuilt cases (BITSMITH_CUDA_PREBUILT) and no TVM compiler to build them")
    root = tmp_path_factory.mktemp("cuda_prebuilt")
    cuda_cases.build_qkernels(root)
    cuda_cases.build_dense_kernels(root)
    cuda_cases.build_models(root)
    return root


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(cuda_cases.MODEL_CASES))
def test_model_logits_match_reference_on_gpu(prebuilt, case):
    for name, err, allowed in cuda_cases.check_model(prebuilt / "models" / case, trust_native_code=BUILT_ELSEWHERE):
        assert err <= allowed, f"{case} {name}: max|y - ref| = {err:.3g} > {allowed:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(cuda_cases.QKERNEL_CASES))  # m = 1 .. 130: GEMV and tensor cores
def test_quantized_kernel_matches_numpy_on_gpu(prebuilt, case):
    for m, ratio in cuda_cases.check_qkernel(prebuilt / "qkernels", case, trust_native_code=BUILT_ELSEWHERE):
        assert ratio <= 1.0, f"{case} m={m}: error {ratio:.3g} x tolerance"


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(cuda_cases.DENSE_CASES))  # fp16 GEMV and tensor cores
def test_dense_kernel_matches_numpy_on_gpu(prebuilt, case):
    for m, ratio in cuda_cases.check_qkernel(prebuilt / "dense", case, trust_native_code=BUILT_ELSEWHERE):
        assert ratio <= 1.0, f"{case} m={m}: error {ratio:.3g} x tolerance"
