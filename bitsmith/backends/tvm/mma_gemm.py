"""Tensor-core GEMM for tvm-cuda's linear kernels, generated as CUDA C with inline PTX
``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (fp16 inputs, float32 accumulation).

Why not TVM's tensorization: TVM 0.27's dlight ``Matmul`` rule with Tensorize segfaults for
fp16 with M, N, K > 64 on sm >= 70 (project toolchain notes), and a quantized weight needs its
decode between the global load and the shared tile, which the rule's fixed pipeline does not
place. So the backend writes the kernel itself, from the kernel's description alone: a dense
fp16 weight is copied, a quantized one is decoded by ``mma_decode``'s generated functions, the
tile loop and the fragment math are shared.

One thread block computes a BM x BN tile of y = x @ W.T over k tiles of BK: each k tile of x
and W is loaded from global memory into registers one tile ahead (software pipelining),
then decoded to fp16 into the other of two shared buffers while the warps run mma on the
current one (one ``__syncthreads`` per tile). Warps split the block as WM x WN x WK; WK > 1
splits the k16 steps of a tile among warps and adds their partial sums through shared memory
(more loads in flight for few rows). Fragment layouts are those of the PTX ISA for
m16n8k16 with f16 A (row) / B (col) and f32 C/D ("Matrix Fragments for mma.m16n8k16",
PTX ISA 8.x, section 9.7.14.5.8); shared rows are padded by 8 halves so the 32-bit fragment
loads of a warp hit 32 different banks. The epilogue adds the outlier corrections (CSR, one
row's few entries per output) and the bias in float32 and rounds once to fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import BitsmithError
from .mma_decode import RUN, DecodeSource, decode_source, fast_path, role_type
from .qlinear_layout import QLinearLayout

PAD = 8  # halves of padding per shared row (conflict-free 32-bit fragment loads)


class TensorCoreUnsupported(BitsmithError):
    """The kernel cannot take the tensor-core path (the message says why)."""


@dataclass(frozen=True)
class MmaTile:
    """Block tile BM x BN x BK and its warps WM x WN x WK (32 threads each)."""

    bm: int
    bn: int
    bk: int
    wm: int
    wn: int
    wk: int

    @property
    def threads(self) -> int:
        return 32 * self.wm * self.wn * self.wk

    @property
    def mt(self) -> int:  # m16 fragments per warp
        return self.bm // self.wm // 16

    @property
    def nt(self) -> int:  # n8 fragments per warp
        return self.bn // self.wn // 8

    @property
    def ksteps(self) -> int:  # k16 steps per warp per k tile
        return self.bk // 16 // self.wk

    def __post_init__(self) -> None:
        if self.bm % (16 * self.wm) or self.bn % (8 * self.wn) or self.bk % (16 * self.wk) or self.bk % RUN:
            raise ValueError(f"mma tile {self} does not split into m16n8k16 fragments per warp")


# Both regimes are bandwidth bound on the benchmark shapes (a 4096 x 4096 fp16 weight at
# m = 128 is 4.3 GFLOP against 32 MB), so the tiles aim at bytes in flight per SM: deep k
# tiles (2-4 16-byte loads per thread per tile) and about one block per SM on N = 4096.
# First choices, to be tuned on a GPU (benchmarks/gpu_kernels.py).
# few rows (decode batches): one m16 tile, 4 warps splitting k -> N/32 blocks even for m = 16
SMALL_TILE = MmaTile(bm=16, bn=32, bk=128, wm=1, wn=1, wk=4)
# many rows (prefill): 2 x 2 warps of 32 x 32
LARGE_TILE = MmaTile(bm=64, bn=64, bk=64, wm=2, wn=2, wk=1)

HELPERS = r"""
#ifndef BITSMITH_MMA_HELPERS
#define BITSMITH_MMA_HELPERS
__device__ __forceinline__ void bitsmith_mma16816(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
"""


@dataclass(frozen=True)
class GemmSpec:
    """What the generated kernel computes: y[m, N] = x[m, K] @ W.T (+ outliers) (+ bias)."""

    in_features: int
    out_features: int
    has_bias: bool
    layout: QLinearLayout | None  # None: dense fp16 weight operand "w"

    def roles(self) -> list[str]:
        if self.layout is None:
            return ["w"] + (["bias"] if self.has_bias else [])
        return self.layout.roles()


def _runs(total: int, threads: int) -> tuple[int, bool]:
    """(iterations per thread, whether the last one needs a bound check)."""
    return -(-total // threads), total % threads != 0


def _loop(total: int, threads: int, var: str, body: str) -> str:
    """``body`` once per unit ``var`` in [0, total), units spread over the block's threads."""
    it, ragged = _runs(total, threads)
    guard = f"if ({var} < {total}) " if ragged else ""
    return (f"    #pragma unroll\n    for (int it_ = 0; it_ < {it}; ++it_) {{\n"
            f"      const int {var} = threadIdx.x + it_ * {threads};\n      {guard}{{\n{body}      }}\n    }}\n")


@dataclass(frozen=True)
class _Loader:
    """Code that moves one k tile of an operand into a shared buffer: ``decl`` (registers),
    ``fetch`` (global -> registers, tile ``k0``) and ``store`` (registers -> shared ``buf``)."""

    decl: str = ""
    fetch: str = ""
    store: str = ""


def _fp16_rows(src: str, smem: str, rows: str, bound: str, k: int, tile: MmaTile, reg: str) -> _Loader:
    """A [rows, K] fp16 matrix (x or a dense weight): 16-byte vectors when K % 8 == 0."""
    bm = tile.bm if smem == "As" else tile.bn
    t = tile.threads
    if k % 8 == 0:
        runs = bm * tile.bk // 8
        it, _ = _runs(runs, t)
        per_row = tile.bk // 8
        idx = (f"        const int row_ = u_ / {per_row}, kc_ = (u_ % {per_row}) * 8;\n"
               f"        const int gr_ = {rows} + row_, gk_ = k0 + kc_;\n")
        fetch = _loop(runs, t, "u_", idx + f"        {reg}[it_] = (gr_ < {bound} && gk_ < {k}) ? "
                      f"*(const uint4*)({src} + (long long)gr_ * {k} + gk_) : make_uint4(0, 0, 0, 0);\n")
        store = _loop(runs, t, "u_", idx + f"        *(uint4*)&{smem}[buf][row_][kc_] = {reg}[it_];\n")
        return _Loader(f"  uint4 {reg}[{it}];\n", fetch, store)
    elems = bm * tile.bk
    store = _loop(elems, t, "u_", f"        const int row_ = u_ / {tile.bk}, kc_ = u_ % {tile.bk};\n"
                  f"        const int gr_ = {rows} + row_, gk_ = k0 + kc_;\n"
                  f"        {smem}[buf][row_][kc_] = (gr_ < {bound} && gk_ < {k}) ? "
                  f"{src}[(long long)gr_ * {k} + gk_] : __float2half(0.0f);\n")
    return _Loader(store=store)


def _quant_weights(lay: QLinearLayout, dec: DecodeSource, tile: MmaTile) -> _Loader:
    t, n_out = tile.threads, lay.out_features
    args = ", ".join(dec.roles)
    if lay.nm is not None:
        block = lay.nm[1]
        if tile.bk % block:
            raise TensorCoreUnsupported(f"N:M sparsity {lay.nm[0]}:{block}: blocks of {block} columns do not "
                                        f"tile the tensor-core k step of {tile.bk}")
        per_row = tile.bk // block
        units = tile.bn * per_row
        store = _loop(units, t, "u_", f"        const int nr_ = u_ / {per_row}, b_ = u_ % {per_row};\n"
                      f"        const int n_ = col0 + nr_, blk_ = k0 / {block} + b_;\n"
                      f"        half* dst_ = &Bs[buf][nr_][b_ * {block}];\n"
                      f"        if (n_ < {n_out} && blk_ < {lay.in_features // block}) "
                      f"{dec.prefix}_block({args}, n_, blk_, dst_);\n"
                      f"        else for (int c_ = 0; c_ < {block}; ++c_) dst_[c_] = __float2half(0.0f);\n")
        return _Loader(store=store)
    per_row = tile.bk // RUN
    units = tile.bn * per_row
    idx = (f"        const int nr_ = u_ / {per_row}, kc_ = (u_ % {per_row}) * {RUN};\n"
           f"        const int n_ = col0 + nr_, kk0_ = k0 + kc_;\n")
    if not dec.fast:  # group size not a multiple of 16: one weight at a time, straight from global
        store = _loop(units, t, "u_", idx + f"        __align__(16) half tmp_[{RUN}];\n"
                      f"        #pragma unroll\n        for (int j_ = 0; j_ < {RUN}; ++j_)\n"
                      f"          tmp_[j_] = n_ < {n_out} ? __float2half({dec.prefix}_value({args}, n_, kk0_ + j_))"
                      f" : __float2half(0.0f);\n"
                      f"        *(uint4*)&Bs[buf][nr_][kc_] = *(const uint4*)tmp_;\n"
                      f"        *(uint4*)&Bs[buf][nr_][kc_ + 8] = *(const uint4*)(tmp_ + 8);\n")
        return _Loader(store=store)
    it, _ = _runs(units, t)
    fetch = _loop(units, t, "u_", idx + f"        wok_[it_] = n_ < {n_out} && kk0_ < {lay.kept};\n"
                  f"        if (wok_[it_]) {dec.prefix}_fetch({args}, n_, kk0_, wr_[it_]);\n")
    grid = "grid_s, " if not lay.asymmetric else ""
    store = _loop(units, t, "u_", idx + f"        __align__(16) half tmp_[{RUN}];\n"
                  f"        if (wok_[it_]) {dec.prefix}_decode16(wr_[it_], {grid}kk0_, tmp_);\n"
                  f"        else for (int j_ = 0; j_ < {RUN}; ++j_) tmp_[j_] = __float2half(0.0f);\n"
                  f"        *(uint4*)&Bs[buf][nr_][kc_] = *(const uint4*)tmp_;\n"
                  f"        *(uint4*)&Bs[buf][nr_][kc_ + 8] = *(const uint4*)(tmp_ + 8);\n")
    return _Loader(f"  {dec.prefix}_run wr_[{it}];\n  bool wok_[{it}];\n", fetch, store)


def _mma_steps(tile: MmaTile) -> str:
    return (f"    #pragma unroll\n    for (int s_ = 0; s_ < {tile.ksteps}; ++s_) {{\n"
            f"      const int kb_ = (wk + {tile.wk} * s_) * 16 + 2 * tig;\n"
            f"      unsigned a_[{tile.mt}][4], b_[{tile.nt}][2];\n"
            f"      #pragma unroll\n      for (int i_ = 0; i_ < {tile.mt}; ++i_) {{\n"
            f"        const int r_ = wm * {tile.bm // tile.wm} + i_ * 16 + gid;\n"
            f"        a_[i_][0] = *(const unsigned*)&As[cur][r_][kb_];\n"
            f"        a_[i_][1] = *(const unsigned*)&As[cur][r_ + 8][kb_];\n"
            f"        a_[i_][2] = *(const unsigned*)&As[cur][r_][kb_ + 8];\n"
            f"        a_[i_][3] = *(const unsigned*)&As[cur][r_ + 8][kb_ + 8];\n      }}\n"
            f"      #pragma unroll\n      for (int j_ = 0; j_ < {tile.nt}; ++j_) {{\n"
            f"        const int c_ = wn * {tile.bn // tile.wn} + j_ * 8 + gid;\n"
            f"        b_[j_][0] = *(const unsigned*)&Bs[cur][c_][kb_];\n"
            f"        b_[j_][1] = *(const unsigned*)&Bs[cur][c_][kb_ + 8];\n      }}\n"
            f"      #pragma unroll\n      for (int i_ = 0; i_ < {tile.mt}; ++i_)\n"
            f"        #pragma unroll\n        for (int j_ = 0; j_ < {tile.nt}; ++j_)\n"
            f"          bitsmith_mma16816(acc[i_][j_], a_[i_], b_[j_]);\n    }}\n")


def _split_k_reduce(tile: MmaTile) -> str:
    if tile.wk == 1:
        return ""
    frags = tile.mt * tile.nt * 4
    slots = (tile.wk - 1) * tile.wm * tile.wn
    return (f"  __shared__ float red_[{slots}][{frags}][32];\n"
            f"  if (wk > 0) {{\n    #pragma unroll\n    for (int f_ = 0; f_ < {frags}; ++f_)\n"
            f"      red_[(wk - 1) * {tile.wm * tile.wn} + wm + {tile.wm} * wn][f_][lane] = "
            f"acc[f_ / {tile.nt * 4}][(f_ / 4) % {tile.nt}][f_ % 4];\n  }}\n"
            f"  __syncthreads();\n  if (wk > 0) return;\n"
            f"  for (int w_ = 1; w_ < {tile.wk}; ++w_)\n    #pragma unroll\n    for (int f_ = 0; f_ < {frags}; ++f_)\n"
            f"      acc[f_ / {tile.nt * 4}][(f_ / 4) % {tile.nt}][f_ % 4] += "
            f"red_[(w_ - 1) * {tile.wm * tile.wn} + wm + {tile.wm} * wn][f_][lane];\n")


def _epilogue(spec: GemmSpec, tile: MmaTile) -> str:
    k, n = spec.in_features, spec.out_features
    extra = ""
    if spec.layout is not None and spec.layout.outlier_width:
        extra += (f"          for (int e_ = outlier_rowptr[col_]; e_ < outlier_rowptr[col_ + 1]; ++e_)\n"
                  f"            v_ += __half2float(X[(long long)row_ * {k} + outlier_cols[e_]]) * outlier_corrections[e_];\n")
    if spec.has_bias:
        extra += "          v_ += __half2float(bias[col_]);\n"
    return (f"  #pragma unroll\n  for (int i_ = 0; i_ < {tile.mt}; ++i_)\n"
            f"    #pragma unroll\n    for (int j_ = 0; j_ < {tile.nt}; ++j_)\n"
            f"      #pragma unroll\n      for (int q_ = 0; q_ < 4; ++q_) {{\n"
            f"        const int row_ = row0 + wm * {tile.bm // tile.wm} + i_ * 16 + gid + (q_ >> 1) * 8;\n"
            f"        const int col_ = col0 + wn * {tile.bn // tile.wn} + j_ * 8 + 2 * tig + (q_ & 1);\n"
            f"        if (row_ < m && col_ < {n}) {{\n          float v_ = acc[i_][j_][q_];\n{extra}"
            f"          Y[(long long)row_ * {n} + col_] = __float2half(v_);\n        }}\n      }}\n")


def check_spec(spec: GemmSpec, act_dtype: str, weight_dtype: str = "float16") -> None:
    """Raises TensorCoreUnsupported where the fp16 mma path does not apply."""
    if act_dtype != "float16" or weight_dtype != "float16":
        raise TensorCoreUnsupported(f"{act_dtype} activations / {weight_dtype} weights (the tensor-core kernels "
                                    f"take fp16; tvm-cuda's act_dtype='float16', the default, gives fp16)")


def gemm_source(spec: GemmSpec, tile: MmaTile, name: str) -> str:
    """CUDA C of ``__device__ void name(const void* x, <operands>, void* y, int m)``; raises
    TensorCoreUnsupported (or DecodeUnsupported) for what it does not generate."""
    k, n = spec.in_features, spec.out_features
    lay = spec.layout
    pre = ""
    if lay is None:
        params = ["const void* w_"] + (["const void* bias_"] if spec.has_bias else [])
        typed = "  const half* __restrict__ W = (const half*)w_;\n" + \
            ("  const half* __restrict__ bias = (const half*)bias_;\n" if spec.has_bias else "")
        wload = _fp16_rows("W", "Bs", "col0", str(n), k, tile, "wr_")
    else:
        dec = decode_source(lay, f"{name}_dq")
        pre = dec.functions
        extra = [r for r in lay.roles() if r not in dec.roles]
        params = list(dec.params) + [f"const void* {r}_" for r in extra]
        typed = dec.prologue + "".join(f"  const {role_type(r)}* __restrict__ {r} = (const {role_type(r)}*){r}_;\n"
                                       for r in extra)
        wload = _quant_weights(lay, dec, tile)
    xload = _fp16_rows("X", "As", "row0", "m", k, tile, "xr_")
    grid = ""
    if lay is not None and not lay.asymmetric and lay.nm is None and fast_path(lay):
        cells = lay.candidates * 16
        grid = (f"  __shared__ signed char grid_s[{cells}];\n"
                f"  for (int i_ = threadIdx.x; i_ < {cells}; i_ += {tile.threads}) grid_s[i_] = grid[i_];\n"
                f"  __syncthreads();\n")
    k_tiles = -(-k // tile.bk)
    ld = tile.bk + PAD
    return (HELPERS + pre +
            f"__device__ __forceinline__ void {name}(const void* x_, {', '.join(params)}, void* y_, int m) {{\n"
            f"  const half* __restrict__ X = (const half*)x_;\n  half* __restrict__ Y = (half*)y_;\n{typed}"
            f"  __shared__ __align__(16) half As[2][{tile.bm}][{ld}];\n"
            f"  __shared__ __align__(16) half Bs[2][{tile.bn}][{ld}];\n{grid}"
            f"  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n"
            f"  const int wm = warp % {tile.wm}, wn = (warp / {tile.wm}) % {tile.wn}, wk = warp / {tile.wm * tile.wn};\n"
            f"  const int gid = lane >> 2, tig = lane & 3;\n"
            f"  const int row0 = blockIdx.y * {tile.bm}, col0 = blockIdx.x * {tile.bn};\n"
            f"  float acc[{tile.mt}][{tile.nt}][4];\n"
            f"  #pragma unroll\n  for (int i_ = 0; i_ < {tile.mt}; ++i_)\n"
            f"    #pragma unroll\n    for (int j_ = 0; j_ < {tile.nt}; ++j_)\n"
            f"      #pragma unroll\n      for (int q_ = 0; q_ < 4; ++q_) acc[i_][j_][q_] = 0.0f;\n"
            f"{xload.decl}{wload.decl}"
            f"  {{\n    const int k0 = 0, buf = 0;\n{xload.fetch}{wload.fetch}{xload.store}{wload.store}  }}\n"
            f"  __syncthreads();\n"
            f"  for (int t_ = 0; t_ < {k_tiles}; ++t_) {{\n    const int cur = t_ & 1;\n"
            f"    if (t_ + 1 < {k_tiles}) {{\n      const int k0 = (t_ + 1) * {tile.bk};\n"
            f"{_indent(xload.fetch + wload.fetch)}    }}\n"
            f"{_mma_steps(tile)}"
            f"    if (t_ + 1 < {k_tiles}) {{\n      const int k0 = (t_ + 1) * {tile.bk}, buf = cur ^ 1;\n"
            f"{_indent(xload.store + wload.store)}    }}\n"
            f"    __syncthreads();\n  }}\n"
            f"{_split_k_reduce(tile)}{_epilogue(spec, tile)}}}\n")


def _indent(code: str) -> str:
    return "".join("  " + line if line else line for line in code.splitlines(keepends=True))
