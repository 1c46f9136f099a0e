"""Random qlinear layers quantized by the quantize pass's own helpers (shared by the TVM CPU and
CUDA kernel tests): an operand set built independently of any kernel under test."""

from __future__ import annotations

import numpy as np

from bitsmith.ir.quant_grids import get_scheme
from bitsmith.passes.quantization.groups import quantize_matrix, select_outliers
from bitsmith.passes.quantization.nm import compress_nm, nm_mask
from bitsmith.passes.quantization.pack import qlinear_operands as pack_qlinear


def make_qlinear(rng: np.random.Generator, scheme: str, k: int, n: int, group_size: int, sparsity: str = "",
                 outliers: float = 0.0, bias: bool = False) -> tuple[dict, list[np.ndarray]]:
    """(attrs, constant operands in IR order) of a qlinear quantizing a random [n, k] weight."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.2, 2.0, (n, 1))).astype(np.float32)
    s = get_scheme(scheme)
    attrs = dict(scheme=scheme, group_size=group_size, in_features=k, out_features=n,
                 sparsity=sparsity, outliers=outliers, bias=bias)
    kept_w, index = w, None
    if sparsity:
        keep, block = (int(p) for p in sparsity.split(":"))
        kept_w, index = compress_nm(w, nm_mask(w, keep, block), keep, block)
    qm = quantize_matrix(kept_w, s, group_size)
    mask = select_outliers(w, s, group_size, outliers) if outliers else None
    arrays = pack_qlinear(qm, s, attrs, mask, w * 3 if outliers else None, index)
    if bias:
        arrays.append(rng.standard_normal(n).astype(np.float32))
    return attrs, arrays


def run_kernel(fn, x: np.ndarray, ops: list[np.ndarray], n: int) -> np.ndarray:
    """y [m, n] of a compiled qlinear kernel ``fn(x, *ops, y)`` on the CPU."""
    import tvm
    dev = tvm.cpu()
    y = tvm.runtime.tensor(np.zeros((x.shape[0], n), np.float32), dev)
    fn(tvm.runtime.tensor(x, dev), *[tvm.runtime.tensor(a, dev) for a in ops], y)
    return y.numpy()
