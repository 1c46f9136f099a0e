"""Weight formats of the MV/MM units and the layer table (docs/fpga-isa.md, "Weight formats").

A layer's weight lives in HBM as sections, each a row-major array: ``weight`` (fp32 dense),
or the quantize pass's packed operands (``codes``, ``scales``, ``zeros``, ``selectors``,
``nm_index``), or, for an fp32 layer the sparsify pass pruned to N:M, ``values`` (the kept
weights) + ``nm_index`` (their in-block positions, log2(M) bits each: 4 bits for N:16 as in
FlightLLM). The unit decodes a row tile by a small table: grid values per candidate grid of
the scheme (BitMoD's FP3/FP4 variants, INT-k), a selector per group picking the grid, a
per-group fp16 scale (and zero point for asymmetric INT-k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.code_packing import group_count, group_index, pack_codes, unpack_codes
from ...ir.quant_grids import get_scheme
from ...ir.quantized import index_bits, kept_per_row, operand_types, parse_sparsity

FP32 = "fp32"


@dataclass(frozen=True)
class Section:
    """One array of a layer in HBM."""

    role: str
    tensor: str      # name in the HBM image (a module constant, or one the backend made)
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


@dataclass(frozen=True)
class Layer:
    """A row of the program's layer table: what MV/MM instructions in weight mode read."""

    name: str
    fmt: str                  # FP32 or a quantization scheme name
    in_features: int
    out_features: int
    group_size: int
    sparsity: str             # "" or "N:M"
    sections: tuple[Section, ...]
    bias: Section | None = None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_sparsity(self.sparsity)

    @property
    def kept(self) -> int:
        return kept_per_row(self.in_features, self.sparsity)

    def tile_bytes(self, rows: int) -> dict[str, int]:
        """Bytes of a ``rows``-row tile per LD buffer (B: values/codes, META: indices,
        SCALE: scales/zeros/selectors)."""
        out = {"B": 0, "META": 0, "SCALE": 0}
        for s in self.sections:
            buf = {"nm_index": "META", "scales": "SCALE", "zeros": "SCALE", "selectors": "SCALE"}.get(s.role, "B")
            out[buf] += s.row_bytes * rows
        return out

    def to_json(self) -> dict:
        sec = [[s.role, s.tensor, list(s.shape), s.dtype] for s in self.sections]
        return {"name": self.name, "fmt": self.fmt, "in": self.in_features, "out": self.out_features,
                "group_size": self.group_size, "sparsity": self.sparsity, "sections": sec,
                "bias": None if self.bias is None else [self.bias.tensor, list(self.bias.shape), self.bias.dtype]}

    @staticmethod
    def from_json(d: dict) -> "Layer":
        secs = tuple(Section(r, t, tuple(int(x) for x in sh), dt) for r, t, sh, dt in d["sections"])
        b = d["bias"]
        bias = None if b is None else Section("bias", b[0], tuple(int(x) for x in b[1]), b[2])
        return Layer(d["name"], d["fmt"], int(d["in"]), int(d["out"]), int(d["group_size"]), d["sparsity"],
                     secs, bias)


def qlinear_layer(name: str, attrs: dict, tensors: list[tuple[str, tuple[int, ...], str]],
                  bias: tuple[str, tuple[int, ...], str] | None) -> Layer:
    roles = [r for r, _ in operand_types(attrs)]
    secs = tuple(Section(r, t, sh, dt) for r, (t, sh, dt) in zip(roles, tensors))
    return Layer(name, attrs["scheme"], attrs["in_features"], attrs["out_features"], attrs["group_size"],
                 attrs["sparsity"] or "", secs, None if bias is None else Section("bias", *bias))


def fp32_layer(name: str, weight: tuple[str, tuple[int, ...], str], sparsity: str,
               bias: tuple[str, tuple[int, ...], str] | None) -> Layer:
    out_f, in_f = weight[1]
    b = None if bias is None else Section("bias", *bias)
    nm = parse_sparsity(sparsity or "")
    if nm is None:
        return Layer(name, FP32, in_f, out_f, in_f, "", (Section("weight", *weight),), b)
    kept = kept_per_row(in_f, sparsity)
    return Layer(name, FP32, in_f, out_f, in_f, sparsity,
                 (Section("values", weight[0] + ".fpga_values", (out_f, kept), "float32"),
                  Section("nm_index", weight[0] + ".fpga_nm_index", (out_f, (kept * index_bits(nm[1]) + 7) // 8),
                          "uint8")), b)


def compress_fp32_nm(weight: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept values [out, in/M*N] and packed in-block indices of an N:M-pruned fp32 weight.
    A block with fewer than N non-zeros keeps zeros at its first free positions; one with more
    is not N:M (ValueError)."""
    out_f, in_f = weight.shape
    blocks = weight.reshape(out_f, in_f // m, m)
    nz = blocks != 0
    if (nz.sum(axis=-1) > n).any():
        raise ValueError(f"weight is not {n}:{m} sparse (a block has more than {n} non-zeros)")
    # rank positions: non-zeros first, then zeros, each in index order; keep the first n, sorted
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :n]
    idx = np.sort(order, axis=-1)
    values = np.take_along_axis(blocks, idx, axis=-1).reshape(out_f, -1)
    return np.ascontiguousarray(values, dtype=np.float32), pack_codes(idx.reshape(out_f, -1), index_bits(m))


def decode_table(fmt: str) -> np.ndarray:
    """The MV unit's value table of a format: [candidates, 2**bits] grid values."""
    scheme = get_scheme(fmt)
    table = np.zeros((len(scheme.candidates), 1 << scheme.bits), dtype=np.float32)
    for i, g in enumerate(scheme.candidates):
        table[i, :len(g.values)] = g.values
    return table


def decode_rows(layer: Layer, arrays: dict[str, np.ndarray], rows: slice) -> np.ndarray:
    """The fp32 weight rows ``rows`` [r, in] from the layer's section arrays (whole sections,
    row-sliced here as the unit reads a row tile)."""
    a = {k: v[rows] for k, v in arrays.items()}
    nm = layer.nm
    kept = layer.kept
    if layer.fmt == FP32:
        if nm is None:
            return a["weight"].astype(np.float32, copy=False)
        vals = a["values"]
    else:
        scheme = get_scheme(layer.fmt)
        codes = unpack_codes(a["codes"], scheme.bits, kept)
        gi = group_index(kept, layer.group_size)
        scale = a["scales"].astype(np.float32)[:, gi]
        if scheme.asymmetric:
            vals = (codes.astype(np.float32) - a["zeros"].astype(np.float32)[:, gi]) * scale
        else:
            table = decode_table(layer.fmt)
            sel = (unpack_codes(a["selectors"], scheme.selector_bits, group_count(kept, layer.group_size))[:, gi]
                   if scheme.selector_bits else np.zeros_like(codes))
            vals = table[sel, codes] * scale
        if nm is None:
            return vals
    n, m = nm
    idx = unpack_codes(a["nm_index"], index_bits(m), kept).astype(np.int64)
    cols = (np.arange(kept) // n) * m + idx
    w = np.zeros((vals.shape[0], layer.in_features), dtype=np.float32)
    np.put_along_axis(w, cols, vals, axis=1)
    return w
