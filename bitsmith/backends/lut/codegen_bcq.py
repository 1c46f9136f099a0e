"""Code generation for ``bcq_linear`` (binary-coded planes, bitsmith/ir/bcq.py): sign planes and
per-plane scales -> instruction stream + engine operands (spec: docs/lut-isa.md, "Binary-coded
planes").

A sign is ``2b - 1`` with ``b`` its stored bit, so with 0/1 tables ``T`` of the activations
(TABLE, unchanged) and ``alpha_i = 2**emin * m_i / 2``:

    y[n] = sum_g ( 2**emin * sum_i m_i * sum_{k in g} b_i x_k  -  (sum_i alpha_i) * sum_{k in g} x_k )

The bits are pair-mode weight words (planes ``2q, 2q+1`` of each row in bytes ``2r, 2r+1``),
the int16 ``m_i`` (a power of two per pow2 term, so the weighting is an integer shift) go to a
BCQMUL record per plane pair, tile and group, and the group's SCALE multiplies by ``2**emin``
(exact) and subtracts the offset term ``(sum_i alpha_i - c * alpha_last) * xs``: a group's
offset ``c * alpha_last`` (bcq_linear's ``offset`` attribute) costs nothing more per call.
Where a row-group's exponents span too far for int16 weights (or the scales are fp16), its
tile-group's records are float32 ``2 alpha_i`` (kind 1, one float multiply per plane) and the
SCALE multiplies by 1.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ...ir import bcq
from ...ir.code_packing import group_count
from . import isa
from .codegen import OUTLIER_DTYPE, LayerProgram, _plane_indices, _unit_words, group_quads, table_blocks

# row of each (row, plane) int16 pair of a kind-0 record, in the order the C executor's
# accumulators hold them: vpunpck{l,h}bw of 16-byte lanes leave rows 0-3, 8-11 in the low
# vector and rows 4-7, 12-15 in the high one
INT_RECORD_ROWS = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])
INT_WEIGHT_MAX = (1 << 15) - 1
MAX_PLANES = 2 * isa.BCQ_SLOTS
BCQ_KG = 2 * 64  # quads per BCQACC (64 pair words; int16 sums stay below 2**15)


def bcq_reason(attrs: Mapping) -> str | None:
    """Why the engine cannot run a bcq_linear with these attributes (None: it can)."""
    if attrs["bits"] > MAX_PLANES:
        return f"{attrs['bits']} planes; the engine runs at most {MAX_PLANES} binary-coded planes"
    if attrs["group_size"] % 4:
        return f"group_size {attrs['group_size']} is not a multiple of 4 (one table per 4 activations)"
    return None


def plane_terms(attrs: Mapping, scales: np.ndarray, block_quads: int) -> tuple[np.ndarray, np.ndarray]:
    """(int16 weights m [bits, out, groups], -1 where a row-group cannot use them; emin [out, groups]):
    alpha_i = 2**emin * m_i / 2 exactly for pow2/apot2 scales. A row-group can when every m_i fits
    int16 and a block's int32 total, at most sum_i m_i * 127 * block_quads, cannot wrap."""
    e = np.asarray(scales).astype(np.int64)
    if e.ndim == 3:
        e = e[..., None]
    live = e != bcq.ZERO_EXPONENT
    big = np.int64(1 << 20)
    emin = np.where(live, e, big).min(axis=(0, 3))                       # [out, groups]
    emin = np.where(emin == big, 0, emin)
    shift = np.where(live, e - emin[None, :, :, None] + 1, 0)
    fits = (~live | (shift <= 14)).all(axis=(0, 3))
    m = np.where(live & (shift <= 14), np.left_shift(1, np.minimum(shift, 14)), 0).sum(axis=3)
    fits &= (m <= INT_WEIGHT_MAX).all(axis=0) & (m.sum(axis=0) * 127 * block_quads < 1 << 31)
    return np.where(fits[None], m, -1), emin


def offset_terms(attrs: Mapping, operands: Sequence[np.ndarray], alpha: np.ndarray) -> np.ndarray:
    """float64 [out, groups]: each group's offset ``c * alpha_last`` (zero without the attribute)."""
    if not bcq.has_offset(attrs):
        return np.zeros(alpha.shape[1:])
    return np.asarray(operands[2]).astype(np.float64) * alpha[-1]


def generate_bcq(attrs: Mapping, operands: Sequence[np.ndarray], table_group: int = 32) -> LayerProgram:
    """Lowers one bcq_linear (planes, scales operands) to a LUT stream (module doc)."""
    bits, k, n, gs = (attrs[a] for a in ("bits", "in_features", "out_features", "group_size"))
    reason = bcq_reason(attrs)
    if reason:
        raise ValueError(reason)
    if table_group % 4 or not 4 <= table_group <= 4 * BCQ_KG:
        raise ValueError(f"table_group must be a multiple of 4 in [4, {4 * BCQ_KG}], got {table_group}")
    planes, scales = operands[0], operands[1]
    groups = group_count(k, gs)
    kpad, npad = 4 * -(-k // 4), 16 * -(-n // 16)
    tiles = npad // 16
    pairs = -(-bits // 2)

    b = np.zeros((npad, kpad), np.uint8)   # u = sum_i b_i 2**i: _plane_indices splits it back into planes
    signs01 = np.unpackbits(np.asarray(planes, np.uint8), axis=-1, count=k, bitorder="little")
    for i in range(bits):
        b[:n, :k] |= signs01[i] << i
    idx = _plane_indices(b, bits)
    alpha = bcq.alphas(attrs, scales)                                   # float64 [bits, out, groups]

    # per (pair, row, group) kind-0 int16 weights or kind-1 float32 weights, then per tile-group the kind
    wint = np.zeros((2 * pairs, npad, groups), np.int64)
    wflt = np.zeros((2 * pairs, npad, groups), np.float32)
    s = np.ones((npad, groups), np.float32)
    int_ok = np.zeros((npad, groups), bool)
    if attrs["scale"] != "fp16":
        m, emin = plane_terms(attrs, scales, table_group // 4)
        int_ok[:n] = (m >= 0).all(axis=0)
        wint[:bits, :n] = np.maximum(m, 0)
        s[:n] = np.where(int_ok[:n], np.ldexp(np.float32(1), emin.astype(np.int32)), 1).astype(np.float32)
    wflt[:bits, :n] = (2 * alpha).astype(np.float32)
    tile_int = int_ok.reshape(tiles, 16, groups).all(axis=1)           # [tiles, groups]
    tile_int[-1] = int_ok[16 * (tiles - 1):n].all(axis=0)               # padding rows do not decide
    row_int = np.repeat(tile_int, 16, axis=0)
    s = np.where(row_int, s, np.float32(1))
    so = np.zeros((npad, groups), np.float32)
    so[:n] = (alpha.sum(axis=0) - offset_terms(attrs, operands, alpha)).astype(np.float32)
    params = np.concatenate([s.reshape(tiles, 16, -1).transpose(0, 2, 1),
                             so.reshape(tiles, 16, -1).transpose(0, 2, 1)], axis=2)   # [tiles, G, 32]

    blocks = table_blocks(group_quads(k, gs), table_group // 4)
    flat_blocks = [blk for bl in blocks for blk in bl]
    recs_int = _records(wint, isa.BCQ_MUL_INT, tiles)     # [pairs][groups] -> [tiles, 2, 32]
    recs_flt = _records(wflt, isa.BCQ_MUL_FLOAT, tiles)   # [pairs][groups] -> [tiles, 4, 32]
    ops, parts = [], []   # the tile template (kind 0, pidx = g) and, per op, what it consumes
    block_id = 0
    for g, group_blocks in enumerate(blocks):
        for q in range(pairs):
            ops.append(isa.encode_columns("BCQMUL", 1, slot=q, kind=isa.BCQ_MUL_INT))
            parts.append(("mul", q, g))
        for j, (c0, cn) in enumerate(group_blocks):
            seg = np.concatenate([_unit_words(idx, isa.MODE_PAIR, 2 * q, c0, cn) for q in range(pairs)], axis=1)
            ops.append(isa.encode_columns("BCQACC", 1, npairs=pairs, kg0=c0, nwords=-(-cn // 2), block=block_id + j))
            parts.append(("words", seg))   # [tiles, pairs * ceil(cn / 2), 32], pair after pair
        ops.append(isa.encode_columns("SCALE", 1, block0=block_id, nblocks=len(group_blocks), pidx=g))
        parts.append(None)
        block_id += len(group_blocks)
    template = np.concatenate(ops)
    mul_at = np.array([i for i, pt in enumerate(parts) if pt and pt[0] == "mul"])
    mul_group = np.array([pt[2] for pt in parts if pt and pt[0] == "mul"])
    is_scale = (template & np.uint64(0xFF)) == isa.FORMATS["SCALE"].opcode
    pidx_lo = np.uint64(dict((f.name, f.lo) for f in isa.FORMATS["SCALE"].fields)["pidx"])
    kind_bit = np.uint64(isa.BCQ_MUL_FLOAT) << np.uint64(dict((f.name, f.lo) for f in isa.FORMATS["BCQMUL"].fields)["kind"])

    body = [isa.StreamHeader(n, kpad, len(flat_blocks), bits).words(),
            isa.encode_columns("TABLE", block=np.arange(len(flat_blocks)), kg0=[a for a, _ in flat_blocks],
                               nkg=[c for _, c in flat_blocks]),
            isa.encode_columns("SYNC", 1)]
    words, wptr = [], 0
    for t in range(tiles):
        block = template.copy()
        block[is_scale] += np.uint64(t * groups) << pidx_lo
        block[mul_at[~tile_int[t, mul_group]]] |= kind_bit
        body += [isa.encode_columns("TILE", 1, wptr=wptr), block,
                 isa.encode_columns("STORE", 1, row0=16 * t, nrows=min(16, n - 16 * t))]
        for pt in parts:
            if pt is None:
                continue
            if pt[0] == "words":
                words.append(pt[1][t])
            else:
                _, q, g = pt
                words.append((recs_int if tile_int[t, g] else recs_flt)[q][g][t])
            wptr += len(words[-1])
    body.append(isa.encode_columns("END", 1))
    return LayerProgram(np.concatenate(body), np.ascontiguousarray(np.concatenate(words)).reshape(-1),
                        np.ascontiguousarray(params, np.float32).reshape(-1), np.zeros(0, OUTLIER_DTYPE), k)


def _records(weights: np.ndarray, kind: int, tiles: int) -> list[list[np.ndarray]]:
    """BCQMUL records of every plane pair, group and tile: [pair][group] -> uint8 [tiles, words, 32].
    kind 0: int16 (row, plane) pairs in ``INT_RECORD_ROWS`` order; kind 1: float32 [16 rows, 2 planes]."""
    out = []
    for q in range(weights.shape[0] // 2):
        w = weights[2 * q:2 * q + 2].transpose(1, 2, 0)                   # [npad, groups, 2]
        w = w.reshape(tiles, 16, w.shape[1], 2).transpose(0, 2, 1, 3)      # [tiles, groups, 16, 2]
        if kind == isa.BCQ_MUL_INT:
            raw = np.ascontiguousarray(w[:, :, INT_RECORD_ROWS].astype("<i2"))
        else:
            raw = np.ascontiguousarray(w.astype("<f4"))
        raw = raw.view(np.uint8).reshape(tiles, w.shape[1], -1, isa.WORD_BYTES)
        out.append([raw[:, g] for g in range(w.shape[1])])
    return out
