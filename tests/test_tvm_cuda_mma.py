"""tvm-cuda's tensor-core GEMM (m > 8): generated CUDA C with inline PTX mma.sync.

No GPU here: the tile walk is emulated in numpy (tests/mma_emulation.py, mma semantics from
the PTX ISA) and compared with x @ W.T; the generated decode functions run on the CPU
(compiled by nvcc for the host) and must give the reference weight rounded to fp16, bit for
bit; every kernel builds for sm_90 with tensor-core instructions in its PTX (slow). On a GPU
(gpu-marked, in test_tvm_cuda.py and here): outputs against numpy at m = 1 .. 130.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import cuda_cases  # noqa: E402
import mma_emulation  # noqa: E402
from bitsmith.backends.tvm.mma_gemm import LARGE_TILE, SMALL_TILE, GemmSpec, TensorCoreUnsupported, gemm_source  # noqa: E402

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"


@pytest.mark.parametrize("tile", [SMALL_TILE, LARGE_TILE], ids=["small", "large"])
@pytest.mark.parametrize("m,n,k", [(16, 32, 64), (9, 40, 96), (70, 72, 40), (33, 8, 200)])
def test_emulated_tile_walk_matches_numpy(tile, m, n, k):
    """Tails in every dim (m, n, k not multiples of the tile). Products of fp16 values are
    exact in float32 and the emulated sums are float64, so the only difference to the float64
    product is the order of float32 additions in mma: <= k * 2^-24 * (|x| @ |W|.T) (the
    standard summation bound), so the test allows max(1e-5, k * 2^-24) of it."""
    rng = np.random.default_rng(m * n + k)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    got = mma_emulation.emulate_gemm(x, w, tile)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T
    assert not np.isnan(got).any(), "an output was never written"
    assert (np.abs(got - ref) <= max(1e-5, k * 2.0 ** -24) * bound + 1e-6).all()


def test_generated_source_uses_the_emulated_fragment_addresses():
    """The emulation restates the kernel's fragment loads and output map; this ties it to the
    text the generator writes (a change in one without the other fails here)."""
    src = gemm_source(GemmSpec(64, 64, False, None), LARGE_TILE, "f")
    for line in ("a_[i_][0] = *(const unsigned*)&As[cur][r_][kb_];",
                 "a_[i_][1] = *(const unsigned*)&As[cur][r_ + 8][kb_];",
                 "a_[i_][2] = *(const unsigned*)&As[cur][r_][kb_ + 8];",
                 "a_[i_][3] = *(const unsigned*)&As[cur][r_ + 8][kb_ + 8];",
                 "b_[j_][0] = *(const unsigned*)&Bs[cur][c_][kb_];",
                 "b_[j_][1] = *(const unsigned*)&Bs[cur][c_][kb_ + 8];",
                 "const int kb_ = (wk + 1 * s_) * 16 + 2 * tig;",
                 "__shared__ __align__(16) half As[2][64][72];",
                 "const int row_ = row0 + wm * 32 + i_ * 16 + gid + (q_ >> 1) * 8;",
                 "const int col_ = col0 + wn * 32 + j_ * 8 + 2 * tig + (q_ & 1);", MMA):
        assert line in src, line


def test_float32_activations_refuse_tensor_cores_with_the_reason():
    from bitsmith.backends.tvm.matmul import linear_kernel
    from bitsmith.backends.tvm.schedule_mma import schedule_tensor_core
    kdef = linear_kernel(64, 32, False, "float32", "float32")
    with pytest.raises(TensorCoreUnsupported, match="float32 activations.*act_dtype='float16'"):
        schedule_tensor_core(kdef.func, LARGE_TILE, "t")


def test_nm_block_wider_than_the_k_step_is_refused_with_the_reason():
    from bitsmith.backends.tvm.matmul import qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.schedule_mma import schedule_tensor_core
    attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(0), "rtn-int4", 256, 16, 64, "2:128")
    kdef = qlinear_kernel(attrs, qlinear_operands(attrs, arrays, "float16"), "float16")
    with pytest.raises(TensorCoreUnsupported, match="N:M sparsity 2:128.*k step of 64"):
        schedule_tensor_core(kdef.func, LARGE_TILE, "t")


def _weight_reference(attrs, arrays) -> tuple[np.ndarray, np.ndarray]:
    """(reference weight as fp16, mask of the positions the decode covers: not outliers)."""
    from bitsmith.ir.quantized import dequantize
    n_weight = len(arrays) - (1 if attrs["bias"] else 0)
    w = dequantize(attrs, arrays[:n_weight])
    covered = np.ones(w.shape, bool)
    if attrs["outliers"]:
        cols, ptr = arrays[n_weight - 2], arrays[n_weight - 1]
        covered[np.repeat(np.arange(w.shape[0]), np.diff(ptr)), cols] = False
    return w.astype(np.float16), covered


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("case", sorted(cuda_cases.QKERNEL_CASES))
def test_generated_decode_gives_the_reference_weight_in_fp16(case):
    """Every scheme, the fast (16-weight run) path and the per-weight paths (group 40, N:M):
    the generated decode equals the reference dequantization rounded to fp16, exactly (both
    form grid value x scale in float32, exact for |value| <= 16, and round once)."""
    from bitsmith.backends.tvm.matmul import qlinear_operands
    from bitsmith.backends.tvm.qlinear_layout import layout_for
    attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(5), *cuda_cases.QKERNEL_CASES[case])
    ops = qlinear_operands(attrs, arrays, "float16")
    width = 0
    if attrs["outliers"]:
        lay0 = layout_for(attrs, 1)
        width = max(1, int(np.diff(ops[lay0.roles().index("outlier_rowptr")]).max()))
    lay = layout_for(attrs, width)
    got = mma_emulation.host_decoded_weight(lay, ops, NVCC)
    ref, covered = _weight_reference(attrs, arrays)
    np.testing.assert_array_equal(got[covered].view(np.uint16), ref[covered].view(np.uint16))


def _ptx_entries(ptx: str) -> dict[str, str]:
    parts = ptx.split(".entry ")[1:]
    return {p.split("(")[0].strip(): p for p in parts}


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("case", sorted(cuda_cases.QKERNEL_CASES) + sorted(cuda_cases.DENSE_CASES))
def test_every_tensor_core_kernel_builds_for_sm_90_with_mma_in_its_ptx(case, tmp_path):
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.matmul import linear_kernel, qlinear_kernel, qlinear_operands
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    if case in cuda_cases.DENSE_CASES:
        kdef = linear_kernel(*cuda_cases.DENSE_CASES[case], "float16", "float16")
        outliers = False
    else:
        attrs, arrays = cuda_cases.make_qlinear(np.random.default_rng(3), *cuda_cases.QKERNEL_CASES[case])
        kdef = qlinear_kernel(attrs, qlinear_operands(attrs, arrays, "float16"), "float16")
        outliers = bool(attrs["outliers"])
    k = CudaCompiler(cuda_target("sm_90"), directory=tmp_path).compile(kdef)
    assert ".target sm_90" in k.ptx
    entries = _ptx_entries(k.ptx)
    expected = {"main", "main_small"} | (set() if outliers else {"main_gemv"})
    assert set(k.functions) == expected
    for fn, how in zip(k.functions, k.schedules):
        body = entries[f"{fn}_kernel"]
        if fn == "main_gemv":
            assert "mma.sync" not in body and how.startswith("hand-written GEMV")
        else:
            assert MMA in body and how.startswith("tensor cores"), (fn, how)
    meta = json.loads(json.dumps(k.meta()))
    assert meta["schedules"] == list(k.schedules)
