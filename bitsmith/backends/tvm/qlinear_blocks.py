"""What the per-group qlinear kernels share (``qlinear_a8``: GGUF blocks, int8 activations, integer
dots; ``qlinear_grouped``: GGUF blocks, float activations; ``qlinear_a8_wide``: zero-point or grid-table
codes in wide groups, int8 activations): which GGUF layouts the first two cover, and the per-row epilogue.

Both compute, per output row and group g of 32 weights (grid ``value = code + low``, scale d_g,
offset m_g), ``d_g * (sum of code x activation)`` in the main loop and add the rest,
``sum_g (d_g low + m_g) xs_g`` (``xs_g``: the group's activation sum), once per row as one
vector dot product over groups (``finish_macro``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .matmul_cpu_kernels import F32, V, hsum
from .qlinear_layout import QLinearLayout

GROUP = 32  # weights per group (GGUF Q4_0 / Q4_1 / Q8_0 blocks)


def layout_reason(lay: QLinearLayout, kernel: str, k_multiple: int) -> str | None:
    """None where a GGUF-block kernel covers ``lay`` (``in_features % k_multiple == 0``), else why
    not: 4-bit affine grids in groups of 32 (Q4_0, Q4_1, Q4_K's sub-blocks, float16 or float32
    scales) and Q8_0."""
    if not lay.affine or not (lay.bits == 4 or (lay.bits == 8 and lay.grid_low == -128 and not lay.offsets)):
        return f"{kernel} needs an affine 4-bit grid (GGUF Q4_0 / Q4_1) or int8 values (GGUF Q8_0)"
    if lay.group_size != GROUP:
        return f"{kernel} needs groups of {GROUP}"
    if lay.in_features % k_multiple or lay.kept != lay.in_features:
        return f"{kernel} needs in_features % {k_multiple} == 0 and no sparsity"
    if lay.has_selectors or lay.nm is not None or lay.outlier_width:
        return f"{kernel} does not cover selectors, N:M or outliers"
    return None


TABLE_BIAS = 64  # grid values v enter the integer dots as v + 64 in [0, 128] (unsigned operand;
# pmaddubsw's pairwise int16 sums stay below 2**15: 128 * 127 * 2), taken back in the integer sum


def coef_term(lay: QLinearLayout) -> bool:
    """Whether rows have a ``(d_g low + m_g) xs_g`` term: GGUF blocks but Q8_0 (low is in its int8
    values). ``qlinear_a8_wide``'s zero points and grid biases are integers, taken back inside its
    integer sums."""
    return lay.affine and (lay.bits == 4 or lay.offsets)


def coef(lay: QLinearLayout, S, O, r, g):
    """(d_g low + m_g) of row r as float32 (a vector where g is a Ramp of groups)."""
    lanes = int(g.lanes) if isinstance(g, tirx.Ramp) else 1
    ty = F32 if lanes == 1 else f"float32x{lanes}"
    if lay.bits == 8:
        return T.Cast(ty, O[r, g])
    low = tirx.const(float(lay.grid_low), F32)
    c = T.Cast(ty, S[r, g]) * (low if lanes == 1 else tirx.Broadcast(low, lanes))
    return c + T.Cast(ty, O[r, g]) if lay.offsets else c


def finish_macro(lay: QLinearLayout, act: str):
    """``finish(XS, S, O, B, Y, acc, a, i, r)``: y[i, r] from the 16 lanes at acc[a:] (the main
    loop's d_g-scaled sums), plus the offset term over XS[i * groups:] (16 groups at a time,
    then the rest; where ``coef_term``), the lane sum, the bias."""
    groups = -(-lay.in_features // lay.group_size)  # a shorter last group counts
    gv = groups // V * V  # groups covered by 16-wide vectors
    with_coef, has_bias = coef_term(lay), lay.has_bias

    @T.macro
    def finish(XS, S, O, B, Y, acc, a, i, r):
        if with_coef:
            for gb in range(gv // V):
                acc[T.Ramp(a, 1, V)] = acc[T.Ramp(a, 1, V)] + coef(lay, S, O, r, T.Ramp(gb * V, 1, V)) * XS[
                    T.Ramp(i * groups + gb * V, 1, V)]
        hsum(acc, a)
        if with_coef:
            for g in range(groups - gv):
                acc[a] = acc[a] + coef(lay, S, O, r, gv + g) * XS[i * groups + gv + g]
        if has_bias:
            acc[a] = acc[a] + T.Cast(F32, B[r])
        Y[i, r] = T.Cast(act, acc[a])

    return finish


PARAMS = ("x", "codes0", "scales", "offsets", "bias", "y")  # the GGUF kernels' full parameter list


def with_roles(main: tirx.PrimFunc, roles: list[str], params: tuple[str, ...] = PARAMS) -> tirx.PrimFunc:
    """``main`` (parameters ``params``) with only x, the layout's operand ``roles`` and y: the
    parameters of ``matmul_defs.qlinear_func`` for that layout."""
    keep = [0] + [params.index(r) for r in roles] + [len(params) - 1]
    return tirx.PrimFunc([main.params[i] for i in keep], main.body, main.ret_type, main.attrs)


def _tree(v, op):
    lanes = V
    while lanes > 1:
        lanes //= 2
        v = op(tirx.Shuffle([v], list(range(lanes))), tirx.Shuffle([v], list(range(lanes, 2 * lanes))))
    return v


def hmax16(v):
    """Largest lane of a float32x16 (a tree of vector maxima on registers)."""
    return _tree(v, tirx.max)


def hsum16(v):
    """Sum of the lanes of a float32x16, as a tree (fixed order)."""
    return _tree(v, lambda a, b: a + b)
