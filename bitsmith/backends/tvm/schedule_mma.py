"""Tensor-core schedules of the linear kernels: the generated CUDA GEMM (``mma_gemm``) behind
a TVM launch wrapper (``cuda_extern``), built from the kernel definition's own description
(the ``bitsmith.matmul`` attribute ``matmul_defs`` records), never from a hand-written file
per scheme."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from tvm import tirx

from .cuda_extern import device_name, extern_kernel, register_source
from .matmul_defs import matmul_attrs
from .mma_decode import DecodeUnsupported
from .mma_gemm import GemmSpec, MmaTile, TensorCoreUnsupported, check_spec, gemm_source
from .qlinear_layout import layout_from_attrs

SCHEDULE_ATTR = "bitsmith.schedule"  # PrimFunc attribute: how the function was scheduled (reported)
_PLACEHOLDER = "BITSMITH_DEVICE_FN"
_GENERATORS = ("mma_gemm.py", "mma_decode.py", "cuda_extern.py", "schedule_mma.py", "schedule_cuda.py")


@functools.cache
def generator_digest() -> str:
    """sha256 (16 hex) of the code that writes CUDA kernels: part of the kernel cache key, so
    a changed generator never reuses a kernel an older one wrote."""
    h = hashlib.sha256()
    for name in _GENERATORS:
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:16]


def gemm_spec(func: tirx.PrimFunc) -> tuple[GemmSpec, str, str]:
    """(what the kernel computes, activation dtype, weight dtype) from a linear definition."""
    a = matmul_attrs(func)
    if a is None:
        raise TensorCoreUnsupported("the definition carries no matmul description")
    if str(a["op"]) == "linear":
        return (GemmSpec(int(a["in_features"]), int(a["out_features"]), bool(a["has_bias"]), None),
                str(a["act_dtype"]), str(a["weight_dtype"]))
    lay = layout_from_attrs(a)
    return GemmSpec(lay.in_features, lay.out_features, lay.has_bias, lay), str(a["act_dtype"]), "float16"


def describe(tile: MmaTile) -> str:
    return (f"tensor cores: generated CUDA, mma.sync m16n8k16 f16->f32, block tile {tile.bm}x{tile.bn}x{tile.bk}, "
            f"warps {tile.wm}x{tile.wn}x{tile.wk}")


def schedule_tensor_core(func: tirx.PrimFunc, tile: MmaTile, stem: str) -> tirx.PrimFunc:
    """The linear kernel ``func`` (x, operands..., y) as a tensor-core GEMM on ``tile``; raises
    TensorCoreUnsupported naming why where it does not apply."""
    spec, act, weight = gemm_spec(func)
    check_spec(spec, act, weight)
    try:
        text = gemm_source(spec, tile, _PLACEHOLDER)
    except DecodeUnsupported as e:
        raise TensorCoreUnsupported(str(e)) from None
    name = device_name(stem, text)
    register_source(name, text.replace(_PLACEHOLDER, name))
    rows = func.params[0].shape[0]
    grid = (-(-spec.out_features // tile.bn), tirx.floordiv(rows + (tile.bm - 1), tile.bm))
    return extern_kernel(func, name, grid, tile.threads).with_attr(SCHEDULE_ATTR, describe(tile))


def schedule_of(func: Any) -> str:
    attrs = func.attrs
    return str(attrs[SCHEDULE_ATTR]) if attrs is not None and SCHEDULE_ATTR in attrs else ""
