"""Checks of the generated tensor-core GEMM that need no GPU.

* ``host_decoded_weight``: the generated decode functions (``mma_decode``), compiled by nvcc
  for the CPU with a small harness, decode a qlinear's kernel operands to the dense fp16
  weight; tests compare it with the reference dequantization rounded to fp16.
* ``emulate_gemm``: the kernel's tile walk in numpy: blocks of BM x BN, k tiles of BK, warps
  WM x WN x WK, each warp's k16 steps, the per-lane fragment addresses the generated code
  uses (``mma_gemm``'s formulas, restated here), mma semantics from the PTX ISA's definition
  of m16n8k16 (D = A @ B + C on the matrices the 32 lanes' registers hold, "Matrix Fragments
  for mma.m16n8k16 with floating point type"), the split-k sum and the epilogue's
  lane -> (row, col) map. A wrong fragment map, warp split or tail guard shows as a wrong
  product against numpy.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bitsmith.backends.tvm.mma_decode import decode_source, host_harness
from bitsmith.backends.tvm.mma_gemm import PAD, MmaTile
from bitsmith.backends.tvm.qlinear_layout import QLinearLayout


def host_decoded_weight(lay: QLinearLayout, operands: list[np.ndarray], nvcc: str) -> np.ndarray:
    """fp16 [out, in] weight decoded on the CPU by the generated functions (N:M pruned = 0)."""
    src = decode_source(lay, "bsdq")
    text = "#include <cuda_fp16.h>\n" + src.functions + host_harness(lay, src)
    with tempfile.TemporaryDirectory(prefix="bitsmith-mma-host-") as d:
        cu, so = Path(d) / "decode.cu", Path(d) / "decode.so"
        cu.write_text(text)
        proc = subprocess.run([nvcc, "-x", "cu", "-shared", "-Xcompiler", "-fPIC", "-O1", "-o", str(so), str(cu)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc (host) failed: {proc.stderr[-1500:]}")
        lib = ctypes.CDLL(str(so))
        ops = [np.ascontiguousarray(operands[lay.roles().index(r)]) for r in src.roles]
        out = np.zeros((lay.out_features, lay.in_features), np.float16)
        fn = getattr(lib, "bsdq_host_dense")
        fn.restype = None
        fn(*[o.ctypes.data_as(ctypes.c_void_p) for o in ops], out.ctypes.data_as(ctypes.c_void_p))
    return out


# ---------------------------------------------------------------- PTX m16n8k16 (f16 A row, B col, f32 C)

def _a_coords(lane: int) -> list[tuple[int, int]]:
    """(row, col) of A elements a0..a7 held by ``lane`` (PTX ISA fragment layout for .f16 A)."""
    g, t = lane >> 2, lane % 4
    out = []
    for i in range(8):
        row = g if i < 2 or 4 <= i < 6 else g + 8
        col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
        out.append((row, col))
    return out


def _b_coords(lane: int) -> list[tuple[int, int]]:
    """(k, col) of B elements b0..b3."""
    g, t = lane >> 2, lane % 4
    return [(t * 2 + (i & 1) + (8 if i >= 2 else 0), g) for i in range(4)]


def _c_coords(lane: int) -> list[tuple[int, int]]:
    """(row, col) of C/D elements c0..c3."""
    g, t = lane >> 2, lane % 4
    return [(g + (8 if i >= 2 else 0), t * 2 + (i & 1)) for i in range(4)]


def mma_m16n8k16(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """a [32, 8] fp16, b [32, 4] fp16, c [32, 4] f32 lane registers -> d [32, 4]."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    C = np.zeros((16, 8), np.float32)
    for lane in range(32):
        for i, (r, k) in enumerate(_a_coords(lane)):
            A[r, k] = a[lane, i]
        for i, (k, n) in enumerate(_b_coords(lane)):
            B[k, n] = b[lane, i]
        for i, (r, n) in enumerate(_c_coords(lane)):
            C[r, n] = c[lane, i]
    D = A.astype(np.float64) @ B.astype(np.float64) + C
    d = np.zeros((32, 4), np.float32)
    for lane in range(32):
        for i, (r, n) in enumerate(_c_coords(lane)):
            d[lane, i] = D[r, n]
    return d


# ---------------------------------------------------------------- the kernel's walk

def _lane_fragments(smem_a: np.ndarray, smem_b: np.ndarray, r0: int, c0: int, kb: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's fragment loads: 32-bit words at As[r][kb + 2 tig (+8)], rows r0 + gid (+8);
    Bs[c0 + gid][kb + 2 tig (+8)] (``mma_gemm._mma_steps``)."""
    a = np.zeros((32, 8), np.float16)
    b = np.zeros((32, 4), np.float16)
    for lane in range(32):
        gid, tig = lane >> 2, lane & 3
        k = kb + 2 * tig
        words_a = [(r0 + gid, k), (r0 + gid + 8, k), (r0 + gid, k + 8), (r0 + gid + 8, k + 8)]
        for w, (r, kk) in enumerate(words_a):
            a[lane, 2 * w:2 * w + 2] = smem_a[r, kk:kk + 2]
        for w, kk in enumerate((k, k + 8)):
            b[lane, 2 * w:2 * w + 2] = smem_b[c0 + gid, kk:kk + 2]
    return a, b


def emulate_gemm(x: np.ndarray, w: np.ndarray, tile: MmaTile) -> np.ndarray:
    """y = x @ w.T as the generated kernel computes it (fp16 inputs, float32 sums)."""
    m, k = x.shape
    n = w.shape[0]
    y = np.full((m, n), np.nan, np.float32)
    ld = tile.bk + PAD
    wtm, wtn = tile.bm // tile.wm, tile.bn // tile.wn
    for by in range(-(-m // tile.bm)):
        for bx in range(-(-n // tile.bn)):
            row0, col0 = by * tile.bm, bx * tile.bn
            acc = np.zeros((tile.wm, tile.wn, tile.wk, tile.mt, tile.nt, 32, 4), np.float32)
            for t in range(-(-k // tile.bk)):
                k0 = t * tile.bk
                As = np.full((tile.bm, ld), np.nan, np.float16)  # padding never read
                Bs = np.full((tile.bn, ld), np.nan, np.float16)
                xa = x[row0:row0 + tile.bm, k0:k0 + tile.bk]
                wb = w[col0:col0 + tile.bn, k0:k0 + tile.bk]
                As[:, :tile.bk] = 0
                Bs[:, :tile.bk] = 0
                As[:xa.shape[0], :xa.shape[1]] = xa  # guarded loads: zeros outside x / W
                Bs[:wb.shape[0], :wb.shape[1]] = wb
                for warp in range(tile.threads // 32):
                    wm, wn, wk = warp % tile.wm, (warp // tile.wm) % tile.wn, warp // (tile.wm * tile.wn)
                    for s in range(tile.ksteps):
                        kb = (wk + tile.wk * s) * 16
                        for i in range(tile.mt):
                            for j in range(tile.nt):
                                a, b = _lane_fragments(As, Bs, wm * wtm + i * 16, wn * wtn + j * 8, kb)
                                acc[wm, wn, wk, i, j] = mma_m16n8k16(a, b, acc[wm, wn, wk, i, j])
            total = acc.sum(axis=2)  # the split-k reduction through shared memory
            for wm in range(tile.wm):
                for wn in range(tile.wn):
                    for i in range(tile.mt):
                        for j in range(tile.nt):
                            for lane in range(32):
                                gid, tig = lane >> 2, lane & 3
                                for q in range(4):
                                    row = row0 + wm * wtm + i * 16 + gid + (q >> 1) * 8
                                    col = col0 + wn * wtn + j * 8 + 2 * tig + (q & 1)
                                    if row < m and col < n:
                                        y[row, col] = total[wm, wn, i, j, lane, q]
    return y
