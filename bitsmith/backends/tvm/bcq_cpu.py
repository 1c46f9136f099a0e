"""Hand-vectorized llvm (CPU) kernel of ``bcq_linear``: sign planes decoded in registers, two
paths per group of ``group_size`` weights of a row, chosen at run time.

Identity both use: with ``pos_p`` the sum of the activations whose plane-p sign is +1 and
``xsum`` the group's plain activation sum, ``sum_k x_k W_k = sum_p alpha_p (2 pos_p - xsum) +
c alpha_last xsum``, so the offset costs nothing per weight and ``xsum`` is computed once per
activation row and group (shared by all output rows), the coefficient ``c alpha_last - sum_p
alpha_p`` and the ``2 alpha_p`` once per row and group, in a table loop that vectorizes (rows
are contiguous in the scales operand).

* Byte-code path (pow2, a group whose nonzero exponents span few octaves): the weights are
  ``2**emin * (code - zero)`` with the integer ``code = sum_p bit_p 2**(e_p - emin + 1)``; when
  the increments sum to at most 255 the code fits a byte and is exact. 64 weights at a time,
  each plane's 8 bytes are bit-cast to 64 one-bit lanes (AVX-512: one ``kmovq`` into a mask
  register) and add the plane's increment to the lanes whose bit is set (one masked byte add);
  the 64 byte codes are widened to float32 16 at a time and multiplied by x (one FMA per
  weight, as the qlinear kernels do), and the group's sum is scaled once by ``2**emin``. The
  term ``-zero * 2**emin`` is the coefficient of ``xsum`` above.
* Float path (apot2, fp16, and pow2 groups whose code would not fit a byte): per plane, the
  activations whose bit is set are summed (``acc + select(bit, x, -0.0)``: a masked add, the
  chunk's two bytes read as a 16-lane mask), then scaled by ``2 alpha_p``.

A group is one expression (no store inside it: the partial sums stay in registers). Activation
rows are walked one at a time (decode re-done per row: prefill is slower than the integer-code
kernels; decode, m = 1, is the case this serves). Needs ``group_size % 16 == 0``; a short last
group's whole chunks take the same paths, the last ``in % 16`` weights are scalar. Parallel
over tasks of ``ROWS`` output rows, one scratch slab per parallel item (TVM 0.27 allocates
locals from a workspace, see matmul_cpu_kernels). Targets without AVX-512 get the same
selects legalized by LLVM (correct, slower).
"""

from __future__ import annotations

from typing import Any, Mapping

from tvm import tirx
from tvm.script import tirx as T

from ...ir.bcq import ZERO_EXPONENT
from .matmul_cpu_kernels import F32, V, VF32, hsum, scratch_layout

ROWS = 8  # output rows per parallel task
NEG_ZERO = tirx.Broadcast(tirx.const(-0.0, F32), V)  # x + -0.0 == x for every x: LLVM folds the select into a masked add


def _alpha_of(scale: str, term):
    """float32 alpha from its stored scale: ``term(t)`` loads term t (apot2: 0 and 1, else 0)."""
    def pow2(e):
        e32 = tirx.Cast("int32", e)
        return tirx.Select(e32 == ZERO_EXPONENT, tirx.const(0.0, F32),
                           tirx.reinterpret(F32, tirx.shift_left(e32 + 127, 23)))
    if scale == "pow2":
        return pow2(term(0))
    if scale == "apot2":
        return pow2(term(0)) + pow2(term(1))
    return tirx.Cast(F32, term(0))


def _alpha(S, scale: str, i, r, g):
    return _alpha_of(scale, lambda t: S[i, r, g, t] if scale == "apot2" else S[i, r, g])


def _block_mask(P, i, r, c, q: int):
    """boolx(16q): the bits of chunks ``c .. c+q-1`` of plane ``i``, row ``r``, one per lane: the
    2q bytes reinterpreted as 16q one-bit lanes (LSB first, as the planes are packed), i.e. a
    bitcast; AVX-512 loads them straight into a mask register (``kmovq``)."""
    lanes = V * q
    raw = P[i, r, tirx.Ramp(c * 2, 1, 2 * q)]
    return tirx.Cast(f"boolx{lanes}", tirx.reinterpret(f"uint1x{lanes}", raw))


BLOCK_CHUNKS = 4  # chunks per byte-code block: 64 one-byte lanes, one zmm (1 and 2 measured 1.2-2x slower)
CHAINS = 2  # interleaved add chains per plane and group (each add a masked add; >1 hides its latency)


def _chains_sum(terms: list):
    """Sum of ``terms`` as ``CHAINS`` left-folded chains (``acc + select(m, x, -0.0)`` becomes one
    masked add), added at the end."""
    chains = []
    for start in range(min(CHAINS, len(terms))):
        acc = terms[start]
        for t in terms[start + CHAINS::CHAINS]:
            acc = acc + t
        chains.append(acc)
    total = chains[0]
    for c in chains[1:]:
        total = total + c
    return total


NO_EXPONENT = 1 << 20  # above every int8 exponent: the minimum over a group's nonzero terms


def _min_of(terms: list):
    out = terms[0]
    for t in terms[1:]:
        out = tirx.min(out, t)
    return out


def _sum_of(terms: list):
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _bit_scalar(P, i, r, kk):
    return tirx.bitwise_and(tirx.shift_right(P[i, r, tirx.floordiv(kk, 8)], tirx.Cast("uint8", tirx.floormod(kk, 8))),
                            tirx.const(1, "uint8"))


def applies(attrs: Mapping[str, Any]) -> bool:
    return int(attrs["group_size"]) % V == 0


def bcq_kernel(attrs: Mapping[str, Any], shapes: list[tuple[tuple[int, ...], str]]):
    """PrimFunc main(x [m, k], planes, scales, [offsets], [bias], y [m, n]) with ``bcq.bcq_func``'s params."""
    bits, k, n, gs = (int(attrs[a]) for a in ("bits", "in_features", "out_features", "group_size"))
    scale, has_bias, act = str(attrs["scale"]), bool(attrs["has_bias"]), str(attrs["act_dtype"])
    has_offset = bool(attrs.get("has_offset", False))
    groups = -(-k // gs)
    if gs % V:
        raise ValueError(f"the vector bcq kernel needs group_size % {V} == 0, got {gs}")
    (pshape, _), (sshape, sdtype) = shapes[0], shapes[1]
    cg = gs // V
    gfull = k // gs
    tail = k - gfull * gs
    tail_chunks, tail_scalar = tail // V, tail % V
    vgroups = gfull + (1 if tail_chunks else 0)  # groups with at least one whole chunk
    tasks = -(-n // ROWS)
    xs0 = V  # after the row accumulator: the group sums of the activation row, one vector per group
    tg = -(-ROWS * groups // V) * V  # a task's (row, group) entries rounded up to whole vectors
    tb0 = xs0 + max(vgroups, 1) * V  # then the task's table: 2 alpha_p per plane, row and group, the x-sum coefficient
    integer = scale == "pow2"  # groups whose planes combine into a byte code (see module docstring)
    sc0 = tb0 + (bits + 1) * tg  # pow2: 2**emin per row and group
    scale_count = 1
    for d in sshape:
        scale_count *= int(d)
    slabs, per_task, per_slab = scratch_layout(tasks, sc0 + (tg if integer else 0))
    per_slab8 = -(-(bits + 1) * tg // 64) * 64  # pow2: each plane's code increment per row and group, the fit flag

    def vec(part, slot):
        return part[T.Ramp(slot, 1, V)]

    @T.macro
    def group_sums(X, part, i0):
        for g in range(vgroups):
            part[T.Ramp(xs0 + g * V, 1, V)] = T.Broadcast(T.float32(0), V)
            for c in range(T.min(cg, (k - g * gs) // V)):
                part[T.Ramp(xs0 + g * V, 1, V)] = vec(part, xs0 + g * V) + T.Cast(
                    VF32, X[i0, T.Ramp((g * cg + c) * V, 1, V)])

    def _sum_coefficient(alpha, offset):
        total = alpha(0)
        for p in range(1, bits):
            total = total + alpha(p)
        if has_offset:
            return tirx.Cast(F32, offset) * alpha(bits - 1) - total
        return -total

    def flat_alpha(SF, task, j):
        """alpha_p of entry ``j = rr * groups + g`` of task ``task`` (rows are contiguous in the
        scales operand, so j indexes it linearly and the table loops vectorize)."""
        at = lambda p: p * n * groups + task * ROWS * groups + j  # noqa: E731
        if scale == "apot2":
            return lambda p: _alpha_of(scale, lambda t: SF[at(p) * 2 + t])
        return lambda p: _alpha_of(scale, lambda t: SF[at(p)])

    @T.macro
    def task_table(SF, O, part, task):
        """Per row and group of the task: ``2 alpha_p`` for every plane and ``c alpha_last - sum_p
        alpha_p`` (the coefficient of the group's x sum), built once per row and group."""
        for j in range(T.min(ROWS, n - task * ROWS) * groups):
            for p in T.unroll(bits):
                part[tb0 + p * tg + j] = T.float32(2) * flat_alpha(SF, task, j)(p)
            part[tb0 + bits * tg + j] = _sum_coefficient(flat_alpha(SF, task, j),
                                                         # row-major O read linearly (offsets may be absent: no flat view)
                                                         O[task * ROWS, j] if has_offset else None)

    def group_term(X, P, part, i0, r, g, j, chunks):
        """float32x16 partial sums of row ``r``'s dot product over group ``g`` (its first ``chunks``
        chunks): ``sum_p 2 alpha_p pos_p + (c alpha_last - sum_p alpha_p) xsum_g``, where ``pos_p``
        sums the activations whose plane-p sign is +1: one expression, so the partial sums stay in
        registers (no store inside a group)."""
        xs = [tirx.Cast(VF32, X[i0, tirx.Ramp((g * cg + c) * V, 1, V)]) for c in range(chunks)]
        total = vec(part, xs0 + g * V) * tirx.Broadcast(part[tb0 + bits * tg + j], V)
        for p in range(bits):
            picked = [tirx.Select(_block_mask(P, p, r, g * cg + c, 1), xs[c], NEG_ZERO) for c in range(chunks)]
            total = total + _chains_sum(picked) * tirx.Broadcast(part[tb0 + p * tg + j], V)
        return total

    def flat_exponent(SF, task, p, j):
        return tirx.Cast("int32", SF[p * n * groups + task * ROWS * groups + j])

    def _increment(e, emin):
        """2**(e - emin + 1), 0 for a zero term, the shift clamped so that it stays defined (a
        clamped one makes the group fail the fit check)."""
        shift = tirx.min(e - emin + 1, 9)
        return tirx.Select(e == ZERO_EXPONENT, tirx.const(0, "int32"), tirx.shift_left(tirx.const(1, "int32"), shift))

    @T.macro
    def code_table(SF, part, tab, task):
        """pow2, per row and group of the task: the byte code increments ``2**(e_p - emin + 1)``,
        the scale ``2**emin`` and whether the codes fit a byte (sum of increments <= 255, some
        term nonzero); a group that does not fit takes the float path. apot2 / fp16: flags only,
        all clear (so the byte table exists for every scale kind: TVM drops an unused one)."""
        if not integer:
            for j in range(T.min(ROWS, n - task * ROWS) * groups):
                tab[bits * tg + j] = T.uint8(0)
        for j in range(T.min(ROWS, n - task * ROWS) * groups if integer else 0):
            emin = T.bind(_min_of([tirx.Select(flat_exponent(SF, task, p, j) == ZERO_EXPONENT, NO_EXPONENT,
                                               flat_exponent(SF, task, p, j)) for p in range(bits)]))
            for p in T.unroll(bits):
                tab[p * tg + j] = T.Cast("uint8", T.min(_increment(flat_exponent(SF, task, p, j), emin), 255))
            tab[bits * tg + j] = T.Cast("uint8", T.Select((emin != NO_EXPONENT) & (_sum_of(
                [_increment(flat_exponent(SF, task, p, j), emin) for p in range(bits)]) <= 255), 1, 0))
            part[sc0 + j] = T.reinterpret(F32, T.shift_left(T.max(T.min(emin, 127), -126) + 127, 23))

    def code_term(X, P, part, tab, i0, r, g, j, chunks):
        """Like ``group_term`` for a group whose weights are ``2**emin * (code - zero)`` with a
        byte ``code = sum_p bit_p 2**(e_p - emin + 1)``: the code is built from the planes by one
        masked byte add per plane and 16q weights, widened to float and multiplied by x (one FMA
        per weight), scaled once by ``2**emin``; ``-zero * 2**emin`` is the x-sum coefficient."""
        q = next(b for b in (4, 2, 1) if chunks % b == 0 and b <= BLOCK_CHUNKS)
        dots = []
        for c0 in range(0, chunks, q):
            code = None
            for p in range(bits):
                inc = tirx.Select(_block_mask(P, p, r, g * cg + c0, q), tirx.Broadcast(tab[p * tg + j], V * q),
                                  tirx.Broadcast(tirx.const(0, "uint8"), V * q))
                code = inc if code is None else code + inc
            for u in range(q):
                chunk_code = tirx.Shuffle([code], [tirx.const(u * V + j, "int32") for j in range(V)])
                dots.append(tirx.Cast(VF32, X[i0, tirx.Ramp((g * cg + c0 + u) * V, 1, V)])
                            * tirx.Cast(VF32, chunk_code))
        return (vec(part, xs0 + g * V) * tirx.Broadcast(part[tb0 + bits * tg + j], V)
                + _chains_sum(dots) * tirx.Broadcast(part[sc0 + j], V))

    @T.macro
    def add_group(X, P, part, tab, i0, r, g, j, chunks):
        if integer:
            if tab[bits * tg + j] != T.uint8(0):
                part[T.Ramp(0, 1, V)] = vec(part, 0) + code_term(X, P, part, tab, i0, r, g, j, chunks)
            else:
                part[T.Ramp(0, 1, V)] = vec(part, 0) + group_term(X, P, part, i0, r, g, j, chunks)
        else:
            part[T.Ramp(0, 1, V)] = vec(part, 0) + group_term(X, P, part, i0, r, g, j, chunks)

    @T.prim_func(s_tir=True)
    def main(x: T.handle, planes: T.handle, scales: T.handle, offsets: T.handle, bias: T.handle, y: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int32()
        X = T.match_buffer(x, (m, k), act)
        P = T.match_buffer(planes, pshape, "uint8")
        S = T.match_buffer(scales, sshape, sdtype)
        O = T.match_buffer(offsets, (n, groups), "int8")
        B = T.match_buffer(bias, (n,), act)
        Y = T.match_buffer(y, (m, n), act)
        SF = T.decl_buffer((scale_count,), sdtype, data=S.data)  # flat views for the table loops
        ws = T.alloc_buffer((slabs * per_slab,), F32)
        ws8 = T.alloc_buffer((slabs * per_slab8,), "uint8")
        for slab in T.parallel(slabs):
            part = T.decl_buffer((per_slab,), F32, data=ws.data, elem_offset=slab * per_slab)
            tab = T.decl_buffer((per_slab8,), "uint8", data=ws8.data, elem_offset=slab * per_slab8)
            for task_in_slab in range(per_task):
                task = T.bind(slab * per_task + task_in_slab)
                for i0 in range(m):
                    if task * ROWS < n:
                        group_sums(X, part, i0)
                        if i0 == 0:
                            task_table(SF, O, part, task)
                            code_table(SF, part, tab, task)
                    for rr in range(ROWS):
                        if task * ROWS + rr < n:
                            part[T.Ramp(0, 1, V)] = T.Broadcast(T.float32(0), V)
                            for g in range(gfull):
                                add_group(X, P, part, tab, i0, task * ROWS + rr, g, rr * groups + g, cg)
                            if tail_chunks > 0:
                                add_group(X, P, part, tab, i0, task * ROWS + rr, gfull, rr * groups + gfull,
                                          tail_chunks)
                            hsum(part, 0)
                            for j in range(tail_scalar):
                                for p in T.unroll(bits):
                                    part[0] = part[0] + T.Cast(F32, X[i0, gfull * gs + tail_chunks * V + j]) * T.Select(
                                        _bit_scalar(P, p, task * ROWS + rr, gfull * gs + tail_chunks * V + j)
                                        == T.uint8(1), _alpha(S, scale, p, task * ROWS + rr, gfull),
                                        -_alpha(S, scale, p, task * ROWS + rr, gfull))
                                if has_offset:
                                    part[0] = part[0] + T.Cast(F32, X[i0, gfull * gs + tail_chunks * V + j]) * (
                                        T.Cast(F32, O[task * ROWS + rr, gfull])
                                        * _alpha(S, scale, bits - 1, task * ROWS + rr, gfull))
                            if has_bias:
                                part[0] = part[0] + T.Cast(F32, B[task * ROWS + rr])
                            Y[i0, task * ROWS + rr] = T.Cast(act, part[0])

    keep = [0, 1, 2] + ([3] if has_offset else []) + ([4] if has_bias else []) + [5]
    return tirx.PrimFunc([main.params[i] for i in keep], main.body, main.ret_type, main.attrs)
