"""Random qlinear operands (packed codes, scales, zeros, selectors, outlier CSR) for LUT tests."""

from __future__ import annotations

import numpy as np

from bitsmith.ir.quant_grids import get_scheme

from bitsmith.ir.code_packing import group_count, pack_codes
from bitsmith.ir.quantized import operand_types

LUT_SCHEMES = ("rtn-int2", "rtn-int3", "rtn-int4", "rtn-int2-sym", "rtn-int3-sym", "rtn-int4-sym",
               "fp3", "fp4", "bitmod-w3", "bitmod-w4")


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
