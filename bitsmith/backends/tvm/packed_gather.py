"""The ``qembedding`` kernel: token rows decoded straight from a tied lm_head's packed 8-bit
codes (rtn-int8, the default head; GGUF Q8_0, SmolLM2's ``token_embd``), so a tvm artifact
stores the table once, as codes, and never a float copy beside them.

rows[n, j] = (code - z) * scale (+ offset), z the group's zero point (asymmetric schemes) or
``-low`` of an affine grid (code + low, ``qlinear_layout.affine_low``). Each step rounds as
``quantized.dequantize`` does (an exact integer difference in float32, one rounding for the
product, one for the offset), so the rows equal the reference's bit for bit. Other widths
gather from the decoded table (``gather_native``: the dequantize legalize pass)."""

from __future__ import annotations

from tvm import te, tirx

from ...ir.quant_grids import get_scheme
from .kernel import KernelDef, Recipe
from .qlinear_layout import affine_low, gather_native


def qembedding_kernel(attrs: dict, id_dtype: str) -> KernelDef:
    """rows[n, in_features] of the packed [out_features, in_features] table, ids range-checked
    by the executor before the call."""
    scheme = get_scheme(str(attrs["scheme"]))
    if not gather_native(scheme):
        raise ValueError(f"qembedding: no gather kernel for scheme {scheme.name} (dequantize it first)")
    vocab, dim, gs = int(attrs["out_features"]), int(attrs["in_features"]), int(attrs["group_size"])
    args = (vocab, dim, gs, str(id_dtype), scheme.scale_dtype, bool(scheme.asymmetric),
            int(affine_low(scheme) or 0), bool(scheme.offsets))
    name = f"qembedding_{vocab}x{dim}_g{gs}_{scheme.name}_{id_dtype}"
    return KernelDef(name, Recipe(qembedding_func, args), "injective")


def qembedding_func(vocab: int, dim: int, group_size: int, id_dtype: str, scale_dtype: str, asymmetric: bool,
                    low: int, offsets: bool) -> tirx.PrimFunc:
    groups = -(-dim // group_size)
    n = tirx.Var("n", "int64")
    codes = te.placeholder((vocab, dim), "uint8", name="codes")
    scales = te.placeholder((vocab, groups), scale_dtype, name="scales")
    zeros = te.placeholder((vocab, groups), "uint8", name="zeros") if asymmetric else None
    offs = te.placeholder((vocab, groups), scale_dtype, name="offsets") if offsets else None
    ids = te.placeholder((n,), id_dtype, name="ids")
    f32 = "float32"

    def row(i, j):
        r, g = tirx.Cast("int64", ids[i]), j // group_size
        code = tirx.Cast(f32, codes[r, j])
        level = code - tirx.Cast(f32, zeros[r, g]) if asymmetric else code + tirx.const(float(low), f32)
        value = level * tirx.Cast(f32, scales[r, g])
        return value + tirx.Cast(f32, offs[r, g]) if offsets else value

    out = te.compute((n, dim), row, name="rows")
    packed = [codes, scales] + ([zeros] if asymmetric else []) + ([offs] if offsets else [])
    return te.create_prim_func(packed + [ids, out])
