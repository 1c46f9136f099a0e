"""Random qlinear operands (packed codes, scales, zeros, selectors, outlier CSR) for LUT tests."""

from __future__ import annotations

import numpy as np

from bitsmith.gguf.blocks import FORMATS
from bitsmith.ir.quant_grids import get_scheme

from bitsmith.ir.code_packing import group_count, pack_codes
from bitsmith.ir.quantized import operand_types

LUT_SCHEMES = ("rtn-int2", "rtn-int3", "rtn-int4", "rtn-int2-sym", "rtn-int3-sym", "rtn-int4-sym",
               "fp3", "fp4", "bitmod-w3", "bitmod-w4")
GGUF_SCHEMES = tuple(sorted(f.scheme_name for f in FORMATS.values()))  # a GGUF file's blocks (offsets: _1, K)


def random_qlinear(rng: np.random.Generator, scheme: str, n: int, k: int, group_size: int,
                   outliers: bool = False) -> tuple[dict, list[np.ndarray]]:
    """(attrs, operands after x) of a qlinear with random but valid codes."""
    sc = get_scheme(scheme)
    attrs = dict(scheme=scheme, group_size=group_size, in_features=k, out_features=n, sparsity="",
                 outliers=outliers, bias=False)
    groups = group_count(k, group_size)
    ops = []
    for role, _ in operand_types(attrs):
        if role == "codes":
            ops.append(pack_codes(rng.integers(0, len(sc.candidates[0].values), (n, k)), sc.bits))
        elif role == "scales":
            ops.append(rng.uniform(0.005, 0.2, (n, groups)).astype(sc.scale_dtype))
        elif role == "offsets":  # GGUF Q4_1 m / K-quant -dmin*m: about the size of a few weights
            ops.append(rng.normal(0, 0.3, (n, groups)).astype(sc.scale_dtype))
        elif role == "zeros":
            ops.append(rng.integers(0, 1 << sc.bits, (n, groups)).astype(np.uint8))
        elif role == "selectors":
            ops.append(pack_codes(rng.integers(0, len(sc.candidates), (n, groups)), sc.selector_bits))
    if outliers:
        counts = rng.integers(0, 3, n).clip(max=k)
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        cols = [np.sort(rng.choice(k, c, replace=False)) for c in counts]
        cols = np.concatenate(cols).astype(np.int32) if cols else np.zeros(0, np.int32)
        ops += [rng.normal(0, 1, int(ptr[-1])).astype(np.float16), cols, ptr]
    return attrs, ops


def engine_magnitude(attrs: dict, ops: list[np.ndarray], x: np.ndarray):
    """(sum_k |x_k| * (|s| * (u + o) + |f| + |outlier|), the integer form): the size of the terms the
    LUT engine adds (float error scales with it; an outlier's lookup part s*(o - o) is still
    computed, then cancels; a float offset f enters through the group's activation sum)."""
    from bitsmith.backends.lut.decompose import decompose
    w = decompose(attrs, ops)
    gi = np.arange(w.u.shape[1]) // w.group_size
    mag = np.abs(w.scales[:, gi]) * (w.u + w.offsets[:, gi]).astype(np.float64)
    if w.float_offsets is not None:
        mag += np.abs(w.float_offsets[:, gi])
    mag[w.outlier_rows, w.outlier_cols] += np.abs(w.outlier_values)
    return np.abs(x).astype(np.float64) @ mag.T, w


def int8_table_bound(x: np.ndarray, w) -> np.ndarray:
    """The int8 tables' error bound [M, N] (docs/lut-isa.md): each entry is off by at most ts/2 =
    max|T|/254 of its block; a weight's planes weigh 1 + 2 + ... + 2**(P-1), so group g adds at
    most |s| * ts_g/2 * quads_g * (2**P - 1) (``w``: the integer form)."""
    from bitsmith.backends.lut import reference_executor
    bound = np.zeros((x.shape[0], w.u.shape[0]))
    gs = w.group_size
    for g0 in range(0, x.shape[1], gs):
        width = min(gs, x.shape[1] - g0)
        xq = np.zeros((x.shape[0], -(-width // 4) * 4), np.float32)
        xq[:, :width] = x[:, g0:g0 + width]
        _, ts, _ = reference_executor.build_tables(xq.reshape(x.shape[0], -1, 4), True)
        bound += (ts[:, None] / 2 * (xq.shape[1] // 4) * (2**w.planes - 1)) * np.abs(w.scales[:, g0 // gs])[None, :]
    return bound
