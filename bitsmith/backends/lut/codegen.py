"""Code generation: one qlinear's integer weight -> instruction stream + engine operands.

Layout (docs/lut-isa.md, "Weight words"): rows are cut into tiles of 16; activations into
quads ``kg`` (4 consecutive inputs, zero padded to a multiple of 4). A weight word is 32 bytes,
byte ``2r + j`` for row ``r`` of the tile holds two 4-bit table indices:

* quad mode (4 planes ``p..p+3`` at one quad): low nibble plane ``p+j``, high nibble plane ``p+2+j``;
* pair mode (2 planes ``p, p+1`` at two quads): low nibble plane ``p+j`` of quad ``kg``,
  high nibble plane ``p+j`` of quad ``kg+1``.

Planes are covered by quad units (0-3, 4-7, ..., a missing fourth plane is all zero) and, for
1 or 2 left over planes, one pair unit. Words are stored in exactly the order the tile's LUTACC
instructions consume them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import isa
from .decompose import IntegerWeight

QUAD_KG = isa.MAX_WORDS[isa.MODE_QUAD]           # quads per quad-mode LUTACC
OUTLIER_DTYPE = np.dtype([("row", "<i4"), ("col", "<i4"), ("val", "<f4")])


@dataclass(frozen=True)
class LayerProgram:
    """What the engine needs for one layer: the stream and its operands (all read-only)."""

    stream: np.ndarray     # uint64 [header + instructions]
    weights: np.ndarray    # uint8 [words * 32]
    params: np.ndarray     # float32 [blocks * 32]
    outliers: np.ndarray   # OUTLIER_DTYPE [nnz]
    in_features: int

    def __post_init__(self) -> None:
        for arr in (self.stream, self.weights, self.params, self.outliers):
            arr.setflags(write=False)  # validated once by the fast executor: must not change after

    @property
    def header(self) -> isa.StreamHeader:
        return isa.StreamHeader.parse(self.stream)


def plane_units(planes: int) -> list[tuple[int, int]]:
    """(mode, first plane) of the units covering ``planes`` bit planes."""
    units, p = [], 0
    while planes - p >= 3:
        units.append((isa.MODE_QUAD, p))
        p += 4
    if planes - p > 0:
        units.append((isa.MODE_PAIR, p))
    return units


def group_quads(in_features: int, group_size: int) -> list[tuple[int, int]]:
    """(first quad, quad count) of each weight group."""
    out = []
    for k0 in range(0, in_features, group_size):
        out.append((k0 // 4, -(-min(group_size, in_features - k0) // 4)))
    return out


def _plane_indices(u: np.ndarray, planes: int) -> np.ndarray:
    """idx[p, n, kg] = sum_j bit_p(u[n, 4kg + j]) << j; planes >= ``planes`` are zero."""
    n, kpad = u.shape
    q = u.reshape(n, kpad // 4, 4)
    top = 4 * len(plane_units(planes)) + 4
    idx = np.zeros((top, n, kpad // 4), np.uint8)
    for p in range(planes):
        b = (q >> p) & 1
        idx[p] = b[..., 0] | (b[..., 1] << 1) | (b[..., 2] << 2) | (b[..., 3] << 3)
    return idx


def _words(lo: list[np.ndarray], hi: list[np.ndarray]) -> np.ndarray:
    """Byte 2r+j = lo[j] | hi[j] << 4 for rows r; [Npad, W] per slot -> [tiles, W, 32]."""
    byte = np.stack([lo[0] | (hi[0] << 4), lo[1] | (hi[1] << 4)], axis=-1)   # [Npad, W, 2]
    npad, w, _ = byte.shape
    byte = byte.reshape(npad // 16, 16, w, 2).transpose(0, 2, 1, 3)
    return byte.reshape(npad // 16, w, 32)


def _unit_words(idx: np.ndarray, mode: int, p: int, kg0: int, nkg: int) -> np.ndarray:
    sub = idx[:, :, kg0:kg0 + nkg]
    if mode == isa.MODE_QUAD:
        return _words([sub[p], sub[p + 1]], [sub[p + 2], sub[p + 3]])
    if nkg % 2:
        sub = np.concatenate([sub, np.zeros(sub.shape[:2] + (1,), np.uint8)], axis=2)
    return _words([sub[p, :, 0::2], sub[p + 1, :, 0::2]], [sub[p, :, 1::2], sub[p + 1, :, 1::2]])


def table_blocks(groups: list[tuple[int, int]], table_quads: int) -> list[list[tuple[int, int]]]:
    """Each weight group's table blocks (first quad, quad count): at most ``table_quads`` quads."""
    return [[(q, min(table_quads, k0 + nk - q)) for q in range(k0, k0 + nk, table_quads)] for k0, nk in groups]


def generate(weight: IntegerWeight, table_group: int = 32) -> LayerProgram:
    """Lowers one layer: re-lays out the weight and emits its instruction stream.

    ``table_group``: activations per table scale (int8 tables quantize each block of this many
    activations with its own scale; smaller blocks are more accurate and cost more LUTACCs).
    """
    if table_group % 4 or not 4 <= table_group <= 4 * QUAD_KG:
        raise ValueError(f"table_group must be a multiple of 4 in [4, {4 * QUAD_KG}], got {table_group}")
    n, k = weight.u.shape
    kpad, npad = 4 * -(-k // 4), 16 * -(-n // 16)
    tiles = npad // 16
    u = np.zeros((npad, kpad), np.uint8)
    u[:n, :k] = weight.u
    idx = _plane_indices(u, weight.planes)
    groups = group_quads(k, weight.group_size)
    blocks = table_blocks(groups, table_group // 4)
    flat_blocks = [b for bl in blocks for b in bl]
    units = plane_units(weight.planes)

    words, acc_ops = [], []   # per-tile word segments and the instructions consuming them
    block_id = 0
    for g, group_blocks in enumerate(blocks):
        first = block_id
        for c0, cn in group_blocks:
            for mode, p in units:
                seg = _unit_words(idx, mode, p, c0, cn)
                words.append(seg)
                acc_ops.append(("LUTACC", mode, p, c0, seg.shape[1], block_id))
            block_id += 1
        acc_ops.append(("SCALE", first, len(group_blocks), g))
    per_tile = np.concatenate(words, axis=1)                # [tiles, words_per_tile, 32]
    wpt = per_tile.shape[1]

    s = np.zeros((npad, len(groups)), np.float32)
    s[:n] = weight.scales
    so = np.zeros_like(s)
    so[:n] = weight.scales * weight.offsets.astype(np.float32)  # exact: fp16 value x small integer
    if weight.float_offsets is not None:  # w = s*(u - o) + f: the activation sum's coefficient is s*o - f
        so[:n] = so[:n] - weight.float_offsets  # exact where o = 0 (every GGUF type with offsets)
    params = np.concatenate([s.reshape(tiles, 16, -1).transpose(0, 2, 1),
                             so.reshape(tiles, 16, -1).transpose(0, 2, 1)], axis=2)  # [tiles, G, 32]

    order = np.lexsort((weight.outlier_cols, weight.outlier_rows))
    outliers = np.zeros(len(order), OUTLIER_DTYPE)
    outliers["row"] = weight.outlier_rows[order] % 16
    outliers["col"] = weight.outlier_cols[order]
    outliers["val"] = weight.outlier_values[order]
    tile_of = weight.outlier_rows[order] // 16
    starts = np.searchsorted(tile_of, np.arange(tiles + 1))

    body = [isa.StreamHeader(n, kpad, len(flat_blocks), weight.planes).words(),
            isa.encode_columns("TABLE", block=np.arange(len(flat_blocks)), kg0=[a for a, _ in flat_blocks],
                               nkg=[b for _, b in flat_blocks]),
            isa.encode_columns("SYNC", 1)]
    template = np.concatenate([
        isa.encode_columns("SCALE", 1, block0=op[1], nblocks=op[2], pidx=op[3]) if op[0] == "SCALE"
        else isa.encode_columns("LUTACC", 1, mode=op[1], plane=op[2], kg0=op[3], nwords=op[4], block=op[5])
        for op in acc_ops])
    is_scale = (template & np.uint64(0xFF)) == isa.FORMATS["SCALE"].opcode
    pidx_lo = np.uint64(dict((f.name, f.lo) for f in isa.FORMATS["SCALE"].fields)["pidx"])
    tile_words = isa.encode_columns("TILE", tiles, wptr=np.arange(tiles) * wpt)
    store_words = isa.encode_columns("STORE", tiles, row0=16 * np.arange(tiles),
                                     nrows=np.minimum(16, n - 16 * np.arange(tiles)))
    for t in range(tiles):
        block = template.copy()
        block[is_scale] += np.uint64(t * len(groups)) << pidx_lo   # pidx = t*G + g
        body += [tile_words[t:t + 1], block]
        for a in range(int(starts[t]), int(starts[t + 1]), 1 << 20):
            body.append(isa.encode_columns("OUTLIER", 1, start=a, count=min(1 << 20, int(starts[t + 1]) - a)))
        body.append(store_words[t:t + 1])
    body.append(isa.encode_columns("END", 1))
    return LayerProgram(np.concatenate(body), np.ascontiguousarray(per_tile).reshape(-1),
                        np.ascontiguousarray(params, np.float32).reshape(-1), outliers, k)
