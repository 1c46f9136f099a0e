"""The slow, obviously correct executor: decodes a stream and runs it one instruction at a time.

Every float operation is written in the order docs/lut-isa.md specifies, in float32, so the
fast C executor (which follows the same order) agrees with it bit for bit; integer table
sums are exact in both.
"""

from __future__ import annotations

import numpy as np

from . import isa, validate
from .codegen import LayerProgram

_BITS = ((np.arange(16)[:, None] >> np.arange(4)[None, :]) & 1).astype(np.float32)  # [e, j]


def build_tables(xq: np.ndarray, int8: bool) -> tuple[np.ndarray, np.float32 | np.ndarray, np.ndarray]:
    """Tables of quads ``xq`` [M, nkg, 4] -> (T [M, nkg, 16], TS [M], XS [M]).

    T[e] = ((b0 x0 + b1 x1) + b2 x2) + b3 x3 in float32 (b_j = bit j of e). int8 tables: one
    scale per row, TS = max|T| / 127, entries rint(T * (127 / max|T|)). XS is the sequential
    float32 sum of the quads' activations (the offset term needs it).
    """
    t = xq[..., 0, None] * _BITS[:, 0]
    for j in (1, 2, 3):
        t = t + xq[..., j, None] * _BITS[:, j]
    xs = np.cumsum(xq.reshape(xq.shape[0], -1), axis=1, dtype=np.float32)[:, -1]
    if not int8:
        return t, np.ones(xq.shape[0], np.float32), xs
    mx = np.abs(t).reshape(t.shape[0], -1).max(axis=1)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(t * inv[:, None, None]), -127, 127).astype(np.int32)
    return q, (mx / np.float32(127)).astype(np.float32), xs


def build_tables_a8(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables of int8 activations (``activation_bits=8``) for quads ``xq`` [M, nkg, 4].

    The block's activations are quantized as llama.cpp's Q8_0 blocks are (d = max|x| / 127,
    q = round(x / d); here rint(x * (127 / max|x|)), ties to even), and the tables hold the
    exact integer sums T[e] = sum_j b_j q_j. TS = d and XS = d * sum(q) (float32), so
    SCALE computes s * d * sum_k (u_k - o) q_k: the integer dot product of a Q4 x Q8 kernel."""
    m = xq.shape[0]
    flat = xq.reshape(m, -1)
    # a block with an inf or NaN has no int8 scale: zero tables and NaN scales (native/lutexec.c
    # does the same), so its outputs are NaN rather than rint(NaN) cast to an integer
    finite = np.isfinite(flat).all(axis=1)
    flat = np.where(finite[:, None], flat, np.float32(0))
    mx = np.abs(flat).max(axis=1) if flat.size else np.zeros(m, np.float32)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.rint(flat * inv[:, None]).astype(np.int64).reshape(xq.shape)
    bits = _BITS.astype(np.int64)
    t = q[..., 0, None] * bits[:, 0] + q[..., 1, None] * bits[:, 1] + q[..., 2, None] * bits[:, 2] \
        + q[..., 3, None] * bits[:, 3]
    ts = np.where(finite, mx / np.float32(127), np.float32(np.nan)).astype(np.float32)
    return t, ts, (ts * q.reshape(m, -1).sum(axis=1).astype(np.float32)).astype(np.float32)


def bcq_plane_weights(record: np.ndarray, kind: int) -> np.ndarray:
    """A BCQMUL record (uint8 words) -> plane weights [16 rows, 2 planes]: int16 (kind 0, stored
    in the lane order of the C executor's accumulators, see ``codegen_bcq.INT_RECORD_ROWS``) or float32."""
    from .codegen_bcq import INT_RECORD_ROWS
    raw = np.ascontiguousarray(record).reshape(-1)
    if kind == isa.BCQ_MUL_FLOAT:
        return raw.view("<f4").reshape(16, 2)
    out = np.zeros((16, 2), np.int16)
    out[INT_RECORD_ROWS] = raw.view("<i2").reshape(16, 2)
    return out


def _wrap32(v: np.ndarray) -> np.ndarray:
    """int64 -> the int32 two's-complement value (vector int32 adds wrap)."""
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def bcq_plane_sums(tables: np.ndarray, words: np.ndarray, kg0: int) -> np.ndarray:
    """Exact integer sums [M, 16 rows, 2 planes] of pair-mode lookups: word w, byte 2r+j: low
    nibble indexes quad kg0+2w, high nibble quad kg0+2w+1, both for plane j of row r."""
    m = tables.shape[0]
    out = np.zeros((m, 16, 2), tables.dtype)   # int64 (int8 tables: exact) or float32 (in word order)
    for w, word in enumerate(words):
        byte = word.reshape(16, 2)
        t0, t1 = tables[:, kg0 + 2 * w], tables[:, kg0 + 2 * w + 1]
        out = out + (t0[:, byte & 15] + t1[:, byte >> 4])
    return out


def run(program: LayerProgram, x: np.ndarray, int8_tables: bool = True, activation_bits: int = 32) -> np.ndarray:
    """y [M, N] = the layer applied to x [M, K] (float32), by interpreting the stream. The
    program is validated first by the fast executor's rules (``validate``): both executors
    refuse the same streams with the same error. ``activation_bits=8``: integer tables of int8
    activations (``build_tables_a8``; ``int8_tables`` must be True)."""
    if activation_bits not in (8, 32):
        raise ValueError(f"activation_bits must be 8 or 32, got {activation_bits!r}")
    a8 = activation_bits == 8
    if a8 and not int8_tables:
        raise ValueError("activation_bits=8 runs on integer tables; fp32 tables take float activations")
    head = validate.check_program(program)
    if x.ndim != 2 or x.shape[1] != program.in_features:
        raise validate.StreamError(f"LUT layer takes x of shape [M, {program.in_features}], got {x.shape}")
    m = x.shape[0]
    xp = np.zeros((m, head.padded_in), np.float32)
    xp[:, :x.shape[1]] = x
    kg_total = head.padded_in // 4
    acc_type = np.int64 if int8_tables else np.float32
    tables = np.zeros((m, kg_total + 1, 16), acc_type)
    ts = np.zeros((m, head.blocks), np.float32)
    xs = np.zeros((m, head.blocks), np.float32)
    y = np.zeros((m, head.out_features), np.float32)
    words = program.weights.reshape(-1, isa.WORD_BYTES)
    params = program.params.reshape(-1, isa.PARAM_FLOATS)
    acc = yt = None
    wptr = 0
    decoded = isa.decode(program.stream[isa.HEADER_WORDS:])
    if a8 and any(i.op in ("BCQMUL", "BCQACC") for i in decoded):
        raise validate.StreamError("binary-coded planes (BCQACC) take float activations, not activation_bits=8")
    mul: dict[int, tuple[int, np.ndarray]] = {}
    for ins in decoded:
        f = dict(ins.args)
        if ins.op == "TABLE":
            k0, nk, g = f["kg0"], f["nkg"], f["block"]
            xq = xp[:, 4 * k0:4 * (k0 + nk)].reshape(m, nk, 4)
            tables[:, k0:k0 + nk], ts[:, g], xs[:, g] = build_tables_a8(xq) if a8 else build_tables(xq, int8_tables)
        elif ins.op == "TILE":
            acc = np.zeros((m, 16), np.float32)
            yt = np.zeros((m, 16), np.float32)
            wptr = f["wptr"]
        elif ins.op == "LUTACC":
            p, kg0, nw = f["plane"], f["kg0"], f["nwords"]
            lo_part = np.zeros((m, 16), acc_type)
            hi_part = np.zeros((m, 16), acc_type)
            two = acc_type(2)
            for w in range(nw):
                byte = words[wptr + w].reshape(16, 2)
                lo, hi = byte & 15, byte >> 4
                if f["mode"] == isa.MODE_QUAD:
                    tab = tables[:, kg0 + w]
                    lo_part = lo_part + (tab[:, lo[:, 0]] + tab[:, lo[:, 1]] * two)
                    hi_part = hi_part + (tab[:, hi[:, 0]] + tab[:, hi[:, 1]] * two)
                else:
                    t0, t1 = tables[:, kg0 + 2 * w], tables[:, kg0 + 2 * w + 1]
                    lo_part = lo_part + (t0[:, lo[:, 0]] + t0[:, lo[:, 1]] * two)
                    lo_part = lo_part + (t1[:, hi[:, 0]] + t1[:, hi[:, 1]] * two)
            wptr += nw
            if int8_tables:  # exact integer sum, converted once, times the block's table scale
                part = lo_part * 2 ** p + (hi_part * 2 ** (p + 2) if f["mode"] == isa.MODE_QUAD else 0)
                acc = acc + part.astype(np.float32) * ts[:, f["block"], None]
            else:
                acc = acc + lo_part * np.float32(2 ** p)
                if f["mode"] == isa.MODE_QUAD:
                    acc = acc + hi_part * np.float32(2 ** (p + 2))
        elif ins.op == "BCQMUL":
            nw = isa.BCQ_MUL_WORDS[f["kind"]]
            mul[f["slot"]] = (f["kind"], bcq_plane_weights(words[wptr:wptr + nw], f["kind"]))
            wptr += nw
        elif ins.op == "BCQACC":
            nw, tsb = f["nwords"], ts[:, f["block"], None]
            total = np.zeros((m, 16), np.int64)   # int32 (wrapping) total of the int16-weighted pairs
            any_int = False
            for q in range(f["npairs"]):
                kind, weights = mul[q]
                sums = bcq_plane_sums(tables, words[wptr + q * nw:wptr + (q + 1) * nw], f["kg0"])   # [m, 16, 2]
                if not int8_tables:  # fp32 tables: float sums times the plane weights as float32, pair by pair
                    for j in range(2):
                        acc = acc + sums[:, :, j] * weights[None, :, j].astype(np.float32)
                elif kind == isa.BCQ_MUL_INT:
                    total = _wrap32(total + (sums * weights.astype(np.int64)).sum(axis=2))
                    any_int = True
                else:
                    for j in range(2):
                        acc = acc + (sums[:, :, j].astype(np.float32) * tsb) * weights[None, :, j]
            if any_int:  # exact integers, converted once per row
                acc = acc + total.astype(np.float32) * tsb
            wptr += f["npairs"] * nw
        elif ins.op == "SCALE":
            blk, b0 = params[f["pidx"]], f["block0"]
            xsum = xs[:, b0]
            for b in range(b0 + 1, b0 + f["nblocks"]):
                xsum = xsum + xs[:, b]
            yt = yt + (acc * blk[None, :16] - blk[None, 16:] * xsum[:, None])
            acc = np.zeros_like(acc)
        elif ins.op == "OUTLIER":
            for rec in program.outliers[f["start"]:f["start"] + f["count"]]:
                yt[:, rec["row"]] = yt[:, rec["row"]] + np.float32(rec["val"]) * xp[:, rec["col"]]
        elif ins.op == "STORE":
            y[:, f["row0"]:f["row0"] + f["nrows"]] = yt[:, :f["nrows"]]
        elif ins.op == "END":
            break
    return y
