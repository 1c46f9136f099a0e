"""Int8-activation llvm (CPU) kernel of ``qlinear`` for codes in wide groups: zero-point schemes
(rtn-int2/3/4/8) and integer grid tables (bitmod-w3/w4, fp3/fp4, rtn-int*-sym) in groups of 128,
...: the ``activation_bits=8`` option of tvm-llvm beyond the GGUF blocks of ``qlinear_a8``.

Why: the float kernels widen every code to float32 and spend ~4-7 vector instructions per 16
weights, so a 2-bit layer costs as much time as a 4-bit one although it reads half the bytes
(SmolLM2 rtn-int2 decoded no faster than the Q4_1 GGUF, issue 15). Here 32 weights cost a shift,
a mask and a quarter of a 32-byte integer dot (AVX-512 VNNI ``vpdpbusd``; AVX2 ``pmaddubsw`` +
``pmaddwd``), as llama.cpp's K-quant dots against activations in int8 blocks (Q8_K); a grid
adds one ``pshufb`` (the group's table, 16 bytes), 3-bit codes their third bit from a 1-bit stream.

Math, per activation row and group g of G weights (codes c, scale d_g, zero point z_g, value
``d_g (c - z_g)``): the activations of the group are quantized as in ``qlinear_a8``, one block
per weight group, ``x^ = dx_g q`` with ``q = round(x / dx_g)`` (nearest even) and
``dx_g = max|x| / 127``, and

    sum_k d_g (c_k - z_g) x^_k = d_g dx_g (sum_k c_k q_k - z_g sum_k q_k),

all of it in int32, exactly: the dot starts from ``-z_g sum_k q_k`` in one lane (``_start``), so
no float term per group is left for the row's epilogue (as a float term it took a third of a
576-wide row's time). 8-bit codes (0..255) go in as ``c - 128`` (signed, ``qlinear_a8``'s Q8_0
form) with the zero point shifted by 128 alike. A grid value v (integers within +-64:
``applies`` reads them from the scheme) goes in as ``v + 64`` (``TABLE_BIAS``: unsigned) with
``64`` as the zero point.
Blocks of G activations are coarser than GGUF's 32 (one large activation sets the step of its
whole block: llama.cpp's Q8_K blocks are 256 wide).

Layout (``qlinear_layout``, sliced16): 16 code bytes hold a chunk of C = 16 * 8 / w weights of
width w, weight ``16 h + j`` in bits ``w h ..`` of byte j. A 32-byte load (two chunks, 2C
weights) shifted by ``w h`` and masked gives the codes of weights ``16 h + j`` of both chunks, so
the quantized activations are stored in that order (``position``) and one integer dot per shift
covers them. G must be a multiple of 2C (``applies``), so a load never straddles groups. 3-bit
codes: the 2-bit stream as above, and 16 bytes of the 1-bit stream hold the third bits of the
same 128 weights (weight ``16 h + j`` in bit h of byte j). With AVX-512 (``zmm``) a decode tile
takes two output rows per 64-byte vector (``_isum_pair``), the same integer sums.

Speed (one Zen 5 thread, 576 x 1536 in cache, us per call; scripts in the issue 15 note):
bitmod-w3 19.3 -> 14.2, rtn-int2 12.8 -> 8.7, rtn-int4 14.4 -> 9.0 with both changes.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ...errors import BitsmithError
from ...ir.quant_grids import get_scheme
from .matmul_cpu_kernels import F32, PREFETCH_ROWS, V, prefetch_row, role_lookup, row_lines, scratch_layout
from .qlinear_a8 import LANES8, _dot_s8s8, _dot_u8s8
from .qlinear_blocks import TABLE_BIAS, finish_macro, hmax16, hsum16, with_roles
from .qlinear_layout import QLinearLayout, field_width

LOAD = 32       # code bytes per integer dot
ROWS = 8        # output rows per parallel task
MTILE = 4       # activation rows against one output row (prefill)
R4 = 4          # output rows against one activation row (decode)
PARAMS = ("x", "codes0", "codes1", "scales", "zeros", "grid", "selectors", "bias", "y")
_PSHUFB = {64: "llvm.x86.avx512.pshuf.b.512", 32: "llvm.x86.avx2.pshuf.b", 16: "llvm.x86.ssse3.pshuf.b.128"}
COVERS = ("the wide-group int8-activation kernel needs 2-, 3-, 4- or 8-bit codes with zero points (rtn-int*) "
          "or 2-, 3- or 4-bit codes of an integer grid table (bitmod-*, fp3, fp4, rtn-int*-sym)")


def _grid_values(lay: QLinearLayout) -> list[int] | None:
    try:
        scheme = get_scheme(lay.scheme)
    except (KeyError, ValueError, BitsmithError):
        return None
    return [int(v) for g in scheme.candidates for v in g.values]


def applies(lay: QLinearLayout) -> str | None:
    """None where the kernel covers ``lay``, else why not (reported with the schedule)."""
    if lay.asymmetric:
        if lay.bits not in (2, 3, 4, 8):
            return COVERS
    elif lay.affine or lay.bits not in (2, 3, 4):
        return COVERS
    else:
        values = _grid_values(lay)
        if values is None or min(values) < -TABLE_BIAS or max(values) > TABLE_BIAS:
            return f"the wide-group int8-activation kernel needs grid values within +-{TABLE_BIAS}"
    unit, c = 2 * chunk(lay.bits), chunk(lay.bits)
    if lay.group_size % unit or lay.in_features % c or lay.kept != lay.in_features:
        return (f"the wide-group int8-activation kernel needs {lay.bits}-bit groups of a multiple of {unit} "
                f"weights, in_features a multiple of {c} and no sparsity")
    if lay.nm is not None or lay.outlier_width or lay.offsets:
        return "the wide-group int8-activation kernel does not cover N:M, outliers or offsets"
    return None


def low_width(bits: int) -> int:
    """Field width of the first code stream (3-bit codes: 2 low bits here, the third in a 1-bit stream)."""
    return 2 if bits == 3 else field_width(bits)


def chunk(bits: int) -> int:
    """Weights per 16 bytes of the first code stream."""
    return V * (8 // low_width(bits))


def position(w, bits: int):
    """Where weight ``w`` of a row goes among the quantized activations (module doc); ``w`` an
    int or a TIR expression (floor division and modulo alike for the non-negative ``w``)."""
    c = chunk(bits)
    return w // (2 * c) * (2 * c) + w % c // V * LOAD + w % (2 * c) // c * V + w % V


def _u8(value: int, lanes: int):
    return tirx.Broadcast(tirx.const(value, "uint8"), lanes)


def qlinear_a8_wide_kernel(lay: QLinearLayout, shapes: list[tuple[tuple[int, ...], str]], act: str, vnni: bool,
                           zmm: bool = False):
    """PrimFunc with the params of ``matmul_defs.qlinear_func(lay, shapes, act)``. ``zmm`` (AVX-512
    BW and VNNI): decode tiles take two output rows per 64-byte vector (``_isum_pair``)."""
    why = applies(lay)
    if why:
        raise ValueError(why)
    roles = lay.roles()
    shp, dt = role_lookup(roles, shapes)
    k, n, gs, bits = lay.in_features, lay.out_features, lay.group_size, lay.bits
    c, width = chunk(bits), low_width(bits)
    table, third = not lay.asymmetric, bits == 3  # grid lookups; a 1-bit stream of third bits
    full, tail = k // gs, k % gs  # whole groups, and the weights of a shorter last group (a multiple of c)
    groups = full + (1 if tail else 0)
    kp = -(-k // (2 * c)) * 2 * c  # quantized activations per row: a last half load keeps its slots
    shifts = 8 // width
    tasks = -(-n // ROWS)
    slabs, per_task, per_slab = scratch_layout(tasks, max(MTILE, R4) * V)

    def _codes(raw, hi, h, lanes):
        """uint8 x lanes: codes of the weights ``16 h + j`` of the one or two chunks in ``raw``
        (``hi``: their third bits, weight ``16 h + j`` of the first chunk in bit h of byte j, of
        the second chunk in bit h of byte 16 + j: ``_third_bits``)."""
        out = raw if h == 0 else tirx.shift_right(raw, _u8(width * h, lanes))
        if h < shifts - 1:
            out = tirx.bitwise_and(out, _u8((1 << width) - 1, lanes))
        if third:  # bit h of hi to bit 2
            moved = (tirx.shift_left(hi, _u8(2 - h, lanes)) if h < 2 else
                     hi if h == 2 else tirx.shift_right(hi, _u8(h - 2, lanes)))
            out = tirx.bitwise_or(out, tirx.bitwise_and(moved, _u8(4, lanes)))
        return out

    def _third_bits(C1, r, g, ld, lanes):
        """The 1-bit stream's 16 bytes for load ld of group g (128 weights, weight ``16 h' + j`` in
        bit h' of byte j): once as they are (the load's first chunk, h' < 4) and, for a 32-byte
        load, shifted down by 4 (its second chunk, h' = 4 + h) next to them."""
        hi = C1[r, tirx.Ramp(g * (gs // 8) + ld * V, 1, V)]
        return hi if lanes == V else tirx.Shuffle([hi, tirx.shift_right(hi, _u8(4, V))], list(range(LOAD)))

    def _table(GR, SEL, r, g):
        """uint8 x 32: the grid of row r's group g (its selected candidate) plus TABLE_BIAS, twice
        (pshufb looks up within each 16-byte half)."""
        row = SEL[r, g] if lay.has_selectors else 0
        t = tirx.reinterpret(f"uint8x{V}", GR[row, tirx.Ramp(0, 1, V)]) + _u8(TABLE_BIAS, V)
        return tirx.Shuffle([t, t], list(range(LOAD)))

    def _dot(codes, acts, total, lanes, tbl):
        if lay.asymmetric and bits == 8:
            part = _dot_s8s8(codes, acts, vnni, lanes)
            return part if total is None else total + part
        if table:
            t = tbl if lanes >= LOAD else tirx.Shuffle([tbl], list(range(V)))
            codes = tirx.call_llvm_pure_intrin(f"uint8x{lanes}", _PSHUFB[lanes], t, codes)
        zero = tirx.Broadcast(tirx.const(0, "int32"), lanes // 4)
        return _dot_u8s8(total if total is not None else zero, codes, acts, vnni, lanes)

    shift = 128 if lay.asymmetric and bits == 8 else 0  # 8-bit codes enter the dots as c - 128

    def _start(Z, SQ, r, i, g, lanes):
        """int32 x lanes where row r's integer dot with group g of activation row i starts: the
        value's offset from what the dot sees (zero point z: ``shift - z``; grid table:
        ``-TABLE_BIAS``) times the group's sum of int8 activations, in lane 0. Then the lanes sum
        to sum (c - z) q or sum v q exactly, and no float term per group is left for ``finish``
        (it cost SmolLM2's 576-wide rows a third of their time)."""
        off = (tirx.const(shift, "int32") - T.Cast("int32", Z[r, g]) if lay.asymmetric
               else tirx.const(-TABLE_BIAS, "int32"))
        zeros = tirx.Broadcast(tirx.const(0, "int32"), lanes)
        return tirx.Shuffle([tirx.Broadcast(off * SQ[i * groups + g], lanes), zeros],
                            [0] + [lanes + j for j in range(lanes - 1)])

    def _isum(C0, C1, GR, SEL, QA, Z, SQ, r, i, g, size):
        """int32x8 whose lanes sum to row r's integer dot with the ``size`` activations of group g
        of activation row i: a 32-byte load per 2c weights, a 16-byte one for a last odd chunk."""
        tbl = _table(GR, SEL, r, g) if table else None
        qbase = i * kp
        total = None
        for ld in range((size + c) // (2 * c)):
            lanes = LOAD if (ld + 1) * 2 * c <= size else V
            raw = C0[r, tirx.Ramp(g * (gs * width // 8) + ld * LOAD, 1, lanes)]
            hi = _third_bits(C1, r, g, ld, lanes) if third else None
            part = _start(Z, SQ, r, i, g, lanes // 4) if ld == 0 else None
            for h in range(shifts):
                acts = QA[tirx.Ramp(qbase + g * gs + ld * 2 * c + h * LOAD, 1, lanes)]
                part = _dot(_codes(raw, hi, h, lanes), acts, part, lanes, tbl)
            if lanes == V:
                part = tirx.Shuffle([part, tirx.Broadcast(tirx.const(0, "int32"), 4)], list(range(8)))
            total = part if total is None else total + part
        return total

    # Two output rows per 64-byte vector (decode on AVX-512): _isum's instructions, each on twice
    # the bytes (row r in bytes 0-31, row r + 1 in 32-63; pshufb looks up within 16 bytes, so
    # each half meets its own row's table): half the vector instructions per weight where they,
    # not memory, bound a decode step. Whole 32-byte loads only, and not 8-bit codes (no 64-byte
    # psignb): other groups go through _isum.
    pair_rows = zmm and vnni and not (lay.asymmetric and bits == 8)

    def _both(a, b, lanes: int = LOAD):  # a's ``lanes``, then b's
        return tirx.Shuffle([a, b], list(range(2 * lanes)))

    def _isum_pair(C0, C1, GR, SEL, QA, Z, SQ, r, i, g, size):
        """int32x16: lanes 0-7 sum to row r's integer dot with group g, lanes 8-15 to row r + 1's."""
        tbl = _both(_table(GR, SEL, r, g), _table(GR, SEL, r + 1, g)) if table else None
        qbase = i * kp
        total = _both(_start(Z, SQ, r, i, g, LANES8), _start(Z, SQ, r + 1, i, g, LANES8), LANES8)
        for ld in range(size // (2 * c)):
            at = g * (gs * width // 8) + ld * LOAD
            raw = _both(C0[r, tirx.Ramp(at, 1, LOAD)], C0[r + 1, tirx.Ramp(at, 1, LOAD)])
            hi = _both(_third_bits(C1, r, g, ld, LOAD), _third_bits(C1, r + 1, g, ld, LOAD)) if third else None
            for h in range(shifts):
                acts = QA[tirx.Ramp(qbase + g * gs + ld * 2 * c + h * LOAD, 1, LOAD)]
                total = _dot(_codes(raw, hi, h, 2 * LOAD), _both(acts, acts), total, 2 * LOAD, tbl)
        return total

    def _half(v, half):
        """int32x8: lanes 0-7 (half 0) or 8-15 (half 1) of ``v``."""
        return tirx.Shuffle([v], [half * LANES8 + j for j in range(LANES8)])

    def _piece(X, i, g, p):  # activations 16 p .. 16 p + 15 of group g
        return T.Cast(f"float32x{V}", X[i, tirx.Ramp(g * gs + p * V, 1, V)])

    def _amax(X, i, g, pieces):
        out = tirx.abs(_piece(X, i, g, 0))
        for p in range(1, pieces):
            out = tirx.max(out, tirx.abs(_piece(X, i, g, p)))
        return out

    def _q(X, i, g, p, inv):
        return tirx.nearbyint(_piece(X, i, g, p) * tirx.Broadcast(inv, V))  # integers, exact in float32

    def _qsum(X, i, g, inv, pieces):
        out = _q(X, i, g, 0, inv)
        for p in range(1, pieces):
            out = out + _q(X, i, g, p, inv)
        return out

    @T.macro
    def quantize_group(X, QA, DX, SQ, i, g, pieces):
        """Group g of row i of x: int8 activations in ``position`` order, its dx and their sum."""
        top = T.bind(hmax16(_amax(X, i, g, pieces)))
        inv = T.bind(T.Select(top > T.float32(0), T.float32(127) / top, T.float32(0)))
        dx = T.bind(top / T.float32(127))
        for p in T.unroll(pieces):
            QA[T.Ramp(i * kp + g * gs + position(p * V, bits), 1, V)] = T.Cast(
                f"int8x{V}", T.Cast(f"int32x{V}", _q(X, i, g, p, inv)))
        DX[i * groups + g] = dx
        SQ[i * groups + g] = T.Cast("int32", hsum16(_qsum(X, i, g, inv, pieces)))  # |sum| <= gs * 127: exact

    finish = finish_macro(lay, act)  # no group terms (coef_term): they are in the integer sums

    pf = {role: row_lines(shp(role), dt(role, "uint8")) for role in ("codes0", "codes1", "scales", "zeros", "selectors")
          if role in roles}

    @T.macro
    def group_step(QA, SQ, DX, C0, C1, GR, SEL, S, Z, acc, nr, mt, i0, r0, g, size):
        if pair_rows and mt == 1 and nr % 2 == 0 and size % (2 * c) == 0:
            for rp in T.unroll(nr // 2):
                both = T.bind(_isum_pair(C0, C1, GR, SEL, QA, Z, SQ, r0 + 2 * rp, i0, g, size))
                for half in T.unroll(2):  # each row's int32x8 then exactly as below: the same bits
                    slot = T.bind((2 * rp + half) * V + (g % 2) * LANES8)
                    acc[T.Ramp(slot, 1, LANES8)] = acc[T.Ramp(slot, 1, LANES8)] + T.Cast(
                        "float32x8", _half(both, half)) * T.Broadcast(
                        T.Cast(F32, S[r0 + 2 * rp + half, g]) * DX[i0 * groups + g], LANES8)
        else:
            for ri in T.unroll(nr):
                for mi in T.unroll(mt):
                    slot = T.bind((ri * mt + mi) * V + (g % 2) * LANES8)  # two chains per output: latency
                    acc[T.Ramp(slot, 1, LANES8)] = acc[T.Ramp(slot, 1, LANES8)] + T.Cast(
                        "float32x8", _isum(C0, C1, GR, SEL, QA, Z, SQ, r0 + ri, i0 + mi, g, size)) * T.Broadcast(
                        T.Cast(F32, S[r0 + ri, g]) * DX[(i0 + mi) * groups + g], LANES8)

    @T.macro
    def tile(QA, SQ, DX, C0, C1, GR, SEL, S, Z, B, Y, acc, nr, mt, i0, r0):
        """Output rows r0 .. r0 + nr - 1 against activation rows i0 .. i0 + mt - 1 (nr * mt <= 4)."""
        for ri in T.unroll(nr):
            if nr > 1:
                prefetch_row(C0, pf["codes0"][0], pf["codes0"][1], r0 + ri + PREFETCH_ROWS, n)
                prefetch_row(S, pf["scales"][0], pf["scales"][1], r0 + ri + PREFETCH_ROWS, n)
                if third:
                    prefetch_row(C1, pf["codes1"][0], pf["codes1"][1], r0 + ri + PREFETCH_ROWS, n)
                if lay.asymmetric:
                    prefetch_row(Z, pf["zeros"][0], pf["zeros"][1], r0 + ri + PREFETCH_ROWS, n)
                if lay.has_selectors:
                    prefetch_row(SEL, pf["selectors"][0], pf["selectors"][1], r0 + ri + PREFETCH_ROWS, n)
            for mi in T.unroll(mt):
                acc[T.Ramp((ri * mt + mi) * V, 1, V)] = T.Broadcast(T.float32(0), V)
        for g in range(full):
            group_step(QA, SQ, DX, C0, C1, GR, SEL, S, Z, acc, nr, mt, i0, r0, g, gs)
        if tail > 0:
            group_step(QA, SQ, DX, C0, C1, GR, SEL, S, Z, acc, nr, mt, i0, r0, full, tail)
        for ri in T.unroll(nr):
            for mi in T.unroll(mt):
                finish(DX, S, Z, B, Y, acc, (ri * mt + mi) * V, i0 + mi, r0 + ri)  # no group terms: DX unread

    @T.prim_func(s_tir=True)
    def main(x: T.handle, c0: T.handle, c1: T.handle, scales: T.handle, zeros: T.handle, grid: T.handle,
             selectors: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        C0 = T.match_buffer(c0, shp("codes0"), "uint8")
        C1 = T.match_buffer(c1, shp("codes1"), "uint8")
        S = T.match_buffer(scales, shp("scales"), lay.scale_dtype)
        Z = T.match_buffer(zeros, shp("zeros"), "uint8")
        GR = T.match_buffer(grid, shp("grid"), "int8")
        SEL = T.match_buffer(selectors, shp("selectors"), "uint8")
        B = T.match_buffer(bias, shp("bias"), dt("bias", act))
        Y = T.match_buffer(y, (m, n), act)
        QA = T.alloc_buffer((m * kp,), "int8")
        DX = T.alloc_buffer((m * groups,), F32)
        SQ = T.alloc_buffer((m * groups,), "int32")
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        for i in range(m):
            for g in range(full):
                quantize_group(X, QA, DX, SQ, i, g, gs // V)
            if tail > 0:
                quantize_group(X, QA, DX, SQ, i, full, tail // V)
        for slab in T.parallel(slabs):
            acc = T.decl_buffer((max(MTILE, R4) * V,), F32, data=ws.data, elem_offset=slab * per_slab)
            for task_in_slab in range(per_task):
                task = T.bind(slab * per_task + task_in_slab)
                for mo in range(m // MTILE):
                    for rr in range(ROWS):
                        if task * ROWS + rr < n:
                            tile(QA, SQ, DX, C0, C1, GR, SEL, S, Z, B, Y, acc, 1, MTILE, mo * MTILE, task * ROWS + rr)
                for mi in range(m % MTILE):
                    for rb in range(ROWS // R4):
                        if task * ROWS + rb * R4 + R4 <= n:
                            tile(QA, SQ, DX, C0, C1, GR, SEL, S, Z, B, Y, acc, R4, 1, m - m % MTILE + mi, task * ROWS + rb * R4)
                        else:
                            for rr in range(R4):
                                if task * ROWS + rb * R4 + rr < n:
                                    tile(QA, SQ, DX, C0, C1, GR, SEL, S, Z, B, Y, acc, 1, 1, m - m % MTILE + mi,
                                         task * ROWS + rb * R4 + rr)

    return with_roles(main, roles, PARAMS)
