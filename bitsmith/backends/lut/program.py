"""The compiled LUT program of a whole module: per-layer streams, their storage and statistics.

Stored in an artifact as ``lut/program.json`` (index: which qlinear each stream belongs to, and
byte ranges) plus four raw little-endian blobs (``lut/streams.bin`` uint64 words,
``lut/weights.bin`` uint8 weight words, ``lut/params.bin`` float32 SCALE blocks,
``lut/outliers.bin`` (int32 row, int32 col, float32 val) records). Nothing is unpickled:
the JSON is data, the blobs are viewed with ``np.frombuffer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ...errors import ArtifactError
from . import isa
from .codegen import OUTLIER_DTYPE, LayerProgram

FORMAT = "bitsmith-lut-program"
FORMAT_VERSION = 1
BLOBS = {"stream": ("lut/streams.bin", np.dtype("<u8")), "weights": ("lut/weights.bin", np.dtype("u1")),
         "params": ("lut/params.bin", np.dtype("<f4")), "outliers": ("lut/outliers.bin", OUTLIER_DTYPE)}
INDEX_FILE = "lut/program.json"


@dataclass(frozen=True)
class LayerEntry:
    """One qlinear (``function``, result value ``value``) and its program."""

    function: str
    value: str
    layer: str          # the weight's tensor name prefix, for people reading stats
    scheme: str
    program: LayerProgram


def layer_stats(p: LayerProgram) -> dict[str, Any]:
    head = p.header
    counts = isa.opcode_counts(p.stream)
    words = isa.field_columns(p.stream, "LUTACC")["nwords"].sum()
    return {
        "instructions": counts,
        "stream_bytes": int(p.stream.nbytes),
        "weight_bytes": int(p.weights.nbytes + p.params.nbytes + p.outliers.nbytes),
        "table_bytes_int8": int((head.padded_in // 4) * 16 + 8 * head.blocks),   # per activation row
        "table_bytes_fp32": int((head.padded_in // 4) * 64 + 8 * head.blocks),
        "lookups": int(words) * 2 * isa.ROWS_PER_TILE * 2,   # 4 nibbles per row per word, per activation row
        "outputs": int(head.out_features),
        "outlier_macs": int(p.outliers.size),
    }


def stream_stats(layers: list[LayerEntry]) -> dict[str, Any]:
    """Totals over layers: instruction counts by opcode, bytes, lookups per output element."""
    ops: dict[str, int] = {}
    tot = {"stream_bytes": 0, "weight_bytes": 0, "table_bytes_int8": 0, "table_bytes_fp32": 0, "lookups": 0,
           "outputs": 0, "outlier_macs": 0}
    for e in layers:
        s = layer_stats(e.program)
        for k, v in s["instructions"].items():
            ops[k] = ops.get(k, 0) + v
        for k in tot:
            tot[k] += s[k]
    return {
        "layers": len(layers),
        "instructions": dict(sorted(ops.items())),
        "stream_bytes": tot["stream_bytes"],
        "weight_bytes": tot["weight_bytes"],
        "table_bytes_per_token": {"int8": tot["table_bytes_int8"], "fp32": tot["table_bytes_fp32"]},
        "lookups_per_output": round(tot["lookups"] / tot["outputs"], 2) if tot["outputs"] else 0.0,
        "outlier_macs_per_token": tot["outlier_macs"],
    }


def to_files(layers: list[LayerEntry], host: str, extra: Mapping[str, Any]) -> dict[str, bytes]:
    blobs = {role: bytearray() for role in BLOBS}
    index = []
    for e in layers:
        ranges = {}
        for role, (_, dtype) in BLOBS.items():
            arr = np.ascontiguousarray(getattr(e.program, role), dtype=dtype)
            ranges[role] = [len(blobs[role]), arr.nbytes]
            blobs[role] += arr.tobytes()
        index.append({"function": e.function, "value": e.value, "layer": e.layer, "scheme": e.scheme,
                      "in_features": e.program.in_features, **ranges})
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "isa_version": isa.VERSION, "host": host,
           **extra, "layers": index, "stats": stream_stats(layers)}
    out = {INDEX_FILE: json.dumps(doc, indent=1, sort_keys=True).encode()}
    out.update({BLOBS[r][0]: bytes(b) for r, b in blobs.items()})
    return out


def from_files(files: Mapping[str, bytes]) -> tuple[list[LayerEntry], dict[str, Any]]:
    """Inverse of to_files; raises ArtifactError naming the bad file."""
    for name in [INDEX_FILE] + [f for f, _ in BLOBS.values()]:
        if name not in files:
            raise ArtifactError(f"target/{name}", "missing from the artifact (needed by target lut-cpu)")
    try:
        doc = json.loads(files[INDEX_FILE])
    except ValueError as e:
        raise ArtifactError(f"target/{INDEX_FILE}", f"not JSON: {e}") from None
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"target/{INDEX_FILE}", f"not a {FORMAT} v{FORMAT_VERSION} index")
    layers = []
    for i, rec in enumerate(doc["layers"]):
        parts = {}
        for role, (fname, dtype) in BLOBS.items():
            off, size = rec[role]
            data = files[fname]
            if off < 0 or size < 0 or off + size > len(data) or size % dtype.itemsize:
                raise ArtifactError(f"target/{fname}", f"layer {i} range [{off}, {off + size}) out of bounds")
            parts[role] = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=off)
        try:
            isa.StreamHeader.parse(parts["stream"])
        except isa.ISAError as e:
            raise ArtifactError("target/lut/streams.bin", f"layer {i}: {e}") from None
        prog = LayerProgram(parts["stream"], parts["weights"], parts["params"], parts["outliers"], int(rec["in_features"]))
        layers.append(LayerEntry(rec["function"], rec["value"], rec["layer"], rec["scheme"], prog))
    return layers, doc
