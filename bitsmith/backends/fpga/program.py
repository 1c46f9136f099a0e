"""The compiled FPGA program of a module and its artifact files (docs/fpga-isa.md, "Files").

Bucket programs whose streams differ only in patchable fields (addresses, lengths, loop
counts: ``isa.PATCHABLE`` and MISC operand addresses) share one *template*: the stored
stream is the template's words, and each bucket keeps a list of (word position, word) patches.

Files (under ``target/``): ``fpga/program.json`` (tables, templates, buckets and their memory
plans), ``fpga/streams.bin`` (little-endian uint32 template words), ``fpga/patches.bin``
(uint32 pairs), ``fpga/weights.bin`` (the HBM constant image), ``fpga/stats.json`` (what
``bitsmith inspect`` prints). Nothing is unpickled; every index is range-checked on load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError
from ..files import target_files
from . import isa
from .codegen import Bucket, Program
from .memory import View

FORMAT, VERSION = "bitsmith-fpga-program", 1
INDEX, STREAMS, PATCHES, WEIGHTS, STATS = ("fpga/program.json", "fpga/streams.bin", "fpga/patches.bin",
                                           "fpga/weights.bin", "fpga/stats.json")


def skeleton(instrs: Sequence[isa.Instr]) -> tuple:
    """What must be equal for two streams to share a template."""
    return tuple((i.queue, tuple(sorted(i.wait)), tuple(sorted(i.release)),
                  tuple((k, v) for k, v in i.fields if k not in isa.PATCHABLE), len(i.inputs)) for i in instrs)


@dataclass
class Packed:
    templates: list[np.ndarray]
    bucket_template: list[int]
    patches: list[np.ndarray]     # per bucket: uint32 [n, 2] (position, word)
    program_bytes: list[int]      # per bucket: its full stream's bytes


def pack(programs: Sequence[Program]) -> Packed:
    templates: list[np.ndarray] = []
    index: dict[tuple, int] = {}
    which, patches, sizes = [], [], []
    for p in programs:
        words = isa.encode_stream(p.instrs)
        sizes.append(int(words.nbytes))
        key = skeleton(p.instrs)
        t = index.get(key)
        if t is None:
            t = index[key] = len(templates)
            templates.append(words)
        base = templates[t]
        pos = np.nonzero(base != words)[0].astype("<u4")
        patches.append(np.stack([pos, words[pos]], axis=1).astype("<u4") if pos.size else np.zeros((0, 2), "<u4"))
        which.append(t)
    return Packed(templates, which, patches, sizes)


def unpack_stream(template: np.ndarray, patch: np.ndarray) -> np.ndarray:
    words = template.copy()
    if patch.size:
        if int(patch[:, 0].max()) >= words.size:
            raise isa.ISAError(f"patch position {int(patch[:, 0].max())} beyond the template's {words.size} words")
        words[patch[:, 0]] = patch[:, 1]
    return words


def size_report(programs: Sequence[Program], packed: Packed, max_length: int, prefill_step: int,
                kv_step: int) -> dict[str, Any]:
    """Stored instruction bytes against one program per length (each length's program is its
    bucket's stream: same instructions, other addresses and counts)."""
    stored = sum(t.nbytes for t in packed.templates) + sum(p.nbytes for p in packed.patches)
    by_bucket = {(p.function, p.bucket.key): n for p, n in zip(programs, packed.program_bytes)}
    per_length = 0
    lengths = 0
    for p in programs:
        b = p.bucket
        if b.phase == "prefill":
            n = min(prefill_step, b.seq)     # seq in (b.seq - step, b.seq]
        elif b.phase == "decode":
            n = min(kv_step, b.past)         # past in (b.past - step, b.past]
        else:
            n = 1
        per_length += n * by_bucket[(p.function, b.key)]
        lengths += n
    return {"programs": len(programs), "templates": len(packed.templates), "stored_bytes": int(stored),
            "per_length_programs": lengths, "per_length_bytes": int(per_length),
            "ratio": round(per_length / stored, 1) if stored else 0.0, "max_length": max_length}


def to_files(doc: dict[str, Any], programs: Sequence[Program], packed: Packed, image: bytes,
             stats: dict[str, Any]) -> dict[str, bytes]:
    stream_blob, patch_blob = bytearray(), bytearray()
    tmpl = []
    for t in packed.templates:
        tmpl.append([len(stream_blob) // 4, int(t.size)])
        stream_blob += t.astype("<u4").tobytes()
    progs = []
    for p, t, patch in zip(programs, packed.bucket_template, packed.patches):
        progs.append({"function": p.function, "phase": p.bucket.phase, "seq": p.bucket.seq, "past": p.bucket.past,
                      "template": t, "patch": [len(patch_blob) // 8, int(patch.shape[0])],
                      "params": [v.to_json() for v in p.params], "results": [v.to_json() for v in p.results],
                      "kv": [[int(k), int(v)] for k, v in sorted(p.kv.items())],
                      "kv_regions": [[int(a), int(c)] for a, c in sorted(p.kv_regions.items())],
                      "hbm_high": int(p.hbm_high), "onchip_high": int(p.onchip_high)})
        patch_blob += patch.astype("<u4").tobytes()
    full = {"format": FORMAT, "version": VERSION, **doc, "templates": tmpl, "programs": progs}
    return {INDEX: json.dumps(full, sort_keys=True, separators=(",", ":")).encode(),
            STREAMS: bytes(stream_blob), PATCHES: bytes(patch_blob), WEIGHTS: image,
            STATS: json.dumps({"stats": stats}, indent=1, sort_keys=True).encode()}


@dataclass
class Loaded:
    doc: dict[str, Any]
    programs: list[Program]
    image: np.ndarray


def _fail(files: Any, name: str, problem: str) -> ArtifactError:
    return ArtifactError(files.path(name), problem[:300])


def from_files(files: Mapping[str, bytes]) -> Loaded:
    tf = target_files(files)
    for name in (INDEX, STREAMS, PATCHES, WEIGHTS):
        if name not in tf:
            raise _fail(tf, name, "missing from the artifact (needed by the fpga targets)")
    try:
        doc = json.loads(tf[INDEX].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(tf, INDEX, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise _fail(tf, INDEX, f"not a {FORMAT} v{VERSION} index")
    if STATS in tf:
        try:
            doc["stats"] = json.loads(tf[STATS].decode("utf-8")).get("stats", {})
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise _fail(tf, STATS, f"not a JSON object with stats: {e}") from None
    streams = tf.read_array(STREAMS, "<u4")
    patches = tf.read_array(PATCHES, "<u4").reshape(-1, 2)
    image = tf.read_array(WEIGHTS, "u1")
    programs = []
    try:
        templates = []
        for off, n in doc["templates"]:
            if not (0 <= off and off + n <= streams.size):
                raise ValueError(f"template range [{off}, {off + n}) outside streams.bin ({streams.size} words)")
            templates.append(streams[off:off + n])
        for i, rec in enumerate(doc["programs"]):
            off, n = rec["patch"]
            if not (0 <= off and off + n <= patches.shape[0]):
                raise ValueError(f"programs[{i}].patch outside patches.bin")
            t = int(rec["template"])
            if not 0 <= t < len(templates):
                raise ValueError(f"programs[{i}].template {t} not among {len(templates)} templates")
            words = unpack_stream(templates[t], patches[off:off + n])
            instrs = isa.decode_stream(words)
            bucket = Bucket(str(rec["phase"]), int(rec["seq"]), int(rec["past"]))
            for a, c in rec["kv_regions"]:  # caps become strides of the simulator's KV views
                if not int(c) >= max(1, bucket.past + bucket.seq) or int(a) < 0:
                    raise ValueError(f"programs[{i}].kv_regions: region {a} with capacity {c} does not hold "
                                     f"{bucket.past + bucket.seq} positions")
            if int(rec["hbm_high"]) < 0 or int(rec["onchip_high"]) < 0:
                raise ValueError(f"programs[{i}]: negative hbm_high/onchip_high")
            programs.append(Program(str(rec["function"]), bucket,
                                    instrs, [View.from_json(v) for v in rec["params"]],
                                    [View.from_json(v) for v in rec["results"]],
                                    {int(k): int(v) for k, v in rec["kv"]},
                                    {int(a): int(c) for a, c in rec["kv_regions"]},
                                    int(rec["hbm_high"]), int(rec["onchip_high"])))
        if int(doc["image_size"]) != image.size:
            raise ValueError(f"image_size {doc['image_size']} != weights.bin size {image.size}")
    except isa.ISAError as e:
        raise _fail(tf, STREAMS, f"{e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(tf, INDEX, f"{type(e).__name__}: {e}") from None
    return Loaded(doc, programs, image)
