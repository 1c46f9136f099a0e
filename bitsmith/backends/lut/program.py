"""The compiled LUT program of a whole module: per-layer streams, their storage and statistics.

Stored in an artifact as ``lut/program.json`` (index: which qlinear each stream belongs to, and
byte ranges) plus four raw little-endian blobs (``lut/streams.bin`` uint64 words,
``lut/weights.bin`` uint8 weight words, ``lut/params.bin`` float32 SCALE blocks,
``lut/outliers.bin`` (int32 row, int32 col, float32 val) records). Nothing is unpickled:
the JSON is data, each blob is read once into an aligned array and the layers view it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ...errors import ArtifactError
from ..files import target_files
from ..json_fields import parse
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
    bcq = isa.field_columns(p.stream, "BCQACC")
    words = isa.field_columns(p.stream, "LUTACC")["nwords"].sum() + (bcq["npairs"] * bcq["nwords"]).sum()
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
    """Inverse of to_files; ArtifactError naming the bad file (and field, for program.json).

    Each blob is read once, straight into an aligned array of its dtype (``read_array``); the
    layers' programs are views into those arrays at ranges checked to lie inside them."""
    tf = target_files(files)
    for name in [INDEX_FILE] + [f for f, _ in BLOBS.values()]:
        if name not in tf:
            raise ArtifactError(tf.path(name), "missing from the artifact (needed by target lut-cpu)")
    doc = parse(tf[INDEX_FILE], tf.path(INDEX_FILE))
    doc.obj()
    if doc["format"].value != FORMAT or doc["version"].value != FORMAT_VERSION:
        doc.fail(f"not a {FORMAT} v{FORMAT_VERSION} index (format {doc['format'].value!r}, "
                 f"version {doc['version'].value!r})"[:200])
    records = doc["layers"].list()
    host_name = doc["host"].str() if doc.has("host") else None
    blobs = {role: tf.read_array(fname, dtype) for role, (fname, dtype) in BLOBS.items()}
    layers, seen = [], set()
    ends = {role: 0 for role in BLOBS}  # to_files lays each blob out layer after layer, without gaps
    for i, rec in enumerate(records):
        parts = {}
        for role, (fname, dtype) in BLOBS.items():
            off, size = rec[role].ints(lo=0, length=2)
            data = blobs[role]
            if off + size > data.nbytes or off % dtype.itemsize or size % dtype.itemsize:
                rec[role].fail(f"byte range [{off}, {off + size}) is not whole {dtype} items inside "
                               f"{fname} ({data.nbytes} bytes)")
            if off != ends[role]:  # another layer's bytes (a valid-looking but wrong program) or a gap
                rec[role].fail(f"byte range starts at {off}, but the previous layer's ends at {ends[role]} "
                               f"(layers tile {fname} in order)")
            ends[role] = off + size
            parts[role] = data[off // dtype.itemsize:(off + size) // dtype.itemsize]
        try:
            head = isa.StreamHeader.parse(parts["stream"])
        except isa.ISAError as e:
            rec["stream"].fail(f"{e}")
        in_features = rec["in_features"].int(1)
        if in_features > head.padded_in:
            rec["in_features"].fail(f"{in_features} is more than the stream's padded input {head.padded_in}")
        function, value = rec["function"].str(), rec["value"].str()
        if (function, value) in seen:
            rec["value"].fail(f"qlinear ({function!r}, {value!r}) has two streams"[:200])
        seen.add((function, value))
        prog = LayerProgram(parts["stream"], parts["weights"], parts["params"], parts["outliers"], in_features)
        layers.append(LayerEntry(function, value, rec["layer"].str(), rec["scheme"].str(), prog))
    for role, (fname, _) in BLOBS.items():
        if ends[role] != blobs[role].nbytes:
            doc["layers"].fail(f"the layers' {role} ranges cover {ends[role]} of the {blobs[role].nbytes} bytes "
                               f"of {fname}")
    out = dict(doc.obj())
    out["host"] = host_name
    return layers, out
