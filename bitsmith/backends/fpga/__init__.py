"""Backend ``fpga``: FlightLLM-style accelerator programs run by a functional + cycle simulator.

Targets ``fpga-u280`` and ``fpga-vhk158`` (built-in presets) and ``fpga`` (``preset=FILE.json``).
Every function is compiled at build time into one program per length bucket (prefill length
rounded up to ``prefill_step``, KV length to ``kv_step``, up to ``max_length``); programs that
differ only in addresses and loop counts share a template (program.py). ``run`` pads the
inputs to the bucket, simulates the program (timing, then numerics in simulated order) and
returns the results unpadded. docs/fpga.md, docs/fpga-isa.md.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import ArtifactError, BitsmithError, OptionError
from ...ir import Module, Node
from ...ir.length_buckets import BUCKETS_ATTR, LengthBuckets
from ...tolerance import Tolerance
from ..base import Backend, Executable, LegalOps, Pipeline, interpretable_ops
from . import isa, presets
from . import program as program_files
from .codegen import ATTN_SOFTMAX, KV_APPEND, Bucket, Program, lower
from .context import build_context, has_data, image_bytes
from .simulator import ProgramInfo, Timing, run_functional, simulate_timing

PRESET_OF_TARGET = {"fpga-u280": "u280", "fpga-vhk158": "vhk158", "fpga": ""}
LM_SYMBOLS = frozenset({"batch", "seq", "past"})


class FPGAOptionError(OptionError):
    pass


def _int_option(options: Mapping[str, Any], key: str, lo: int) -> int:
    v = options.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise FPGAOptionError(f"option {key} must be an int >= {lo}, got {v!r}")
    return v


def resolve_preset(target: str, options: Mapping[str, Any]) -> presets.Preset:
    if isinstance(options.get("preset_data"), dict):   # stored in the artifact: the file may be gone
        return presets.from_dict(options["preset_data"], "the artifact's preset")
    name = options.get("preset") or PRESET_OF_TARGET.get(target, "")
    if not name:
        raise FPGAOptionError("target fpga needs --option preset=FILE.json (or use fpga-u280 / fpga-vhk158)")
    return presets.load(str(name))


def buckets_for(fn: Any, module: Module, steps: LengthBuckets) -> list[Bucket]:
    """The buckets a function is compiled for: one static program, or the LM main's prefill and
    decode buckets."""
    from ...ir import symbolic as sym
    symbols: set[str] = set()
    for p in fn.params:
        for d in p.type.shape:
            symbols |= sym.symbols(d)
    if not symbols:
        return [Bucket("static", 0, 0)]
    if not symbols <= LM_SYMBOLS or not any(p.name.startswith("past_") for p in fn.params):
        raise BitsmithError(f"fpga targets compile one program per length bucket: function {fn.name!r} has "
                            f"symbolic dims {sorted(symbols)}; only a kv-cache causal-LM function (batch, seq, "
                            f"past) or a static one is supported")
    return steps.buckets()


class FPGAExecutable(Executable):
    """Thread-safe: per-call memory; shared caches (timings, decoded layers) are filled under a lock."""

    def __init__(self, module: Module, target: str, options: Mapping[str, Any], preset: presets.Preset,
                 doc: dict[str, Any], programs: list[Program], image: np.ndarray | None,
                 files: dict[str, bytes] | None = None) -> None:
        self.module, self.target, self.options, self.preset = module, target, dict(options), preset
        self.doc, self.image = doc, image
        self.programs = {(p.function, p.bucket.key): p for p in programs}
        self.steps = LengthBuckets.from_json(doc["buckets"])
        from .weights import Layer
        self.layers = [Layer.from_json(d) for d in doc["layers"]]
        self.misc_ops = list(doc["misc_ops"])
        self.image_addrs = {k: int(v[0]) for k, v in doc["image"].items()}
        self._files = files
        self._timings: dict[tuple[str, str], Timing] = {}
        self._decoded: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.last: dict[str, Any] = {}

    def info(self, p: Program) -> ProgramInfo:
        return ProgramInfo(self.module, p.function, p.bucket, self.layers, self.misc_ops, int(self.doc["image_size"]),
                           p.kv_regions, p.hbm_high, p.onchip_high, self.image_addrs)

    def timing(self, p: Program) -> Timing:
        key = (p.function, p.bucket.key)
        t = self._timings.get(key)
        if t is None:
            t = simulate_timing(p.instrs, self.info(p), self.preset)
            with self._lock:
                self._timings[key] = t
        return t

    def bucket_of(self, fn: Any, args: Sequence[np.ndarray]) -> tuple[Bucket, int, int]:
        if not any(p.name.startswith("past_") for p in fn.params):
            return Bucket("static", 0, 0), 0, 0
        seq = args[0].shape[1]
        past_i = [i for i, p in enumerate(fn.params) if p.name.startswith("past_")][0]
        past = args[past_i].shape[2]
        bucket = self.steps.bucket(seq, past)
        return bucket, seq, past

    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.image is None:
            raise BitsmithError("this fpga executable was built in timing-only mode (constants known by shape): "
                                "it simulates cycles but has no weights to compute with")
        fn = self.module.function(function)
        if len(args) != len(fn.params):
            raise BitsmithError(f"function {function!r} takes {len(fn.params)} inputs, got {len(args)}")
        is_lm = any(p.name.startswith("past_") for p in fn.params)
        if not is_lm:
            return self._run_row(fn, list(args))
        rows = [self._run_row(fn, [a[b:b + 1] for a in args]) for b in range(args[0].shape[0])]
        return [np.concatenate([r[i] for r in rows], axis=0) for i in range(len(rows[0]))]

    def _run_row(self, fn: Any, args: list[np.ndarray]) -> list[np.ndarray]:
        bucket, seq, past = self.bucket_of(fn, args)
        p = self.programs.get((fn.name, bucket.key))
        if p is None:
            raise BitsmithError(f"no fpga program for {fn.name} at {bucket.key} (compiled up to max_length "
                                f"{self.steps.max_length}; recompile with a larger max_length)")
        inputs = []
        for prm, view, a in zip(fn.params, p.params, args):
            a = np.asarray(a)
            if prm.name.startswith("past_"):
                inputs.append((view.__class__(view.space, view.addr, a.shape, view.strides, view.dtype), a))
                continue
            if bucket.phase == "prefill" and a.ndim >= 2 and a.shape[1] != view.shape[1]:
                pad = [(0, 0)] * a.ndim
                pad[1] = (0, view.shape[1] - a.shape[1])
                a = np.pad(a, pad)   # padded tokens (id 0, position 0) only feed padded rows
            inputs.append((view, a))
        timing = self.timing(p)
        info = self.info(p)
        mem = run_functional(p.instrs, timing, info, self.image, self._decoded, inputs, kv_valid=past)
        self.last = {"bucket": bucket.key, **timing.summary()}
        outs = []
        for i, (r, view) in enumerate(zip(fn.results, p.results)):
            arr = mem.view(view.space, view.addr, view.shape, view.dtype).copy() if i not in p.kv else None
            if i in p.kv:
                cap = info.kv_regions[view.addr]
                full = mem.view(view.space, view.addr, view.shape, view.dtype)
                new = seq if bucket.phase != "static" else 0
                arr = np.concatenate([full[:, :, :past], full[:, :, bucket.past:bucket.past + new]], axis=2)
                assert cap >= bucket.past + new
            elif bucket.phase != "static":
                t = fn.result_types()[i]
                idx = tuple(slice(0, seq) if d == "seq" else slice(None) for d in t.shape)
                arr = arr[idx]
            outs.append(np.array(arr, copy=True, order="C"))
        return outs

    def files(self) -> dict[str, bytes]:
        if self._files is None:
            raise BitsmithError("a timing-only fpga build has no weights to store")
        return dict(self._files)

    def report(self) -> dict[str, Any]:
        return {"preset": self.preset.name, "stats": self.doc.get("stats", {}), "last_run": dict(self.last)}


def _legal_check(node: Node) -> str | None:
    if node.op == "attention" and len(node.inputs) != 3:
        return "attention with a key-padding mask (4th input) is not supported by the fpga lowering"
    if node.op == "qlinear" and node.attr("outliers"):
        return "qlinear with fp16 outliers is not supported by the MV/MM units (compile without --outliers)"
    if node.op == "call":
        return "calls must be inlined (the fpga pipeline runs inline)"
    for o in node.outputs if node.op != "constant" else ():
        if o.type.dtype in ("float16", "bfloat16", "float64"):
            return f"result dtype {o.type.dtype}: the fpga simulator models float32 activations"
    return None


class FPGABackend(Backend):
    name = "fpga"
    targets = ("fpga-u280", "fpga-vhk158", "fpga")

    def option_defaults(self, target: str) -> dict[str, Any]:
        return {"preset": PRESET_OF_TARGET[target], "max_length": 0, "prefill_step": 128, "kv_step": 16}

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        """float32 products and sums (tiles, softmax) against the reference's float64 ones:
        the same bound as tvm-llvm's float32 kernels (docs/writing-a-backend.md table). Measured
        on random Llama/Qwen2 logits, every scheme and sparsity: max error 1.5e-7..2.4e-7 (AVX-512
        Zen 4), so ~400x below atol - room for another CPU's BLAS summation order."""
        return Tolerance(rtol=1e-5, atol=1e-4, scale_rtol=1e-5)

    def pipeline(self, target: str, options: Mapping[str, Any]) -> Pipeline:
        steps = f"length_adaptive{{prefill_step={options.get('prefill_step', 128)},kv_step={options.get('kv_step', 16)}," \
                f"max_length={options.get('max_length', 0)}}}"
        # the MV/MM decode table holds the quantize pass's fitted schemes (fp16 scales, no float
        # offsets); a file's own block formats (gguf-*) run as dense layers on their exact weights
        from ..scheme_fallback import dequantize_specs
        legalize = ("inline", "drop-attention-mask") + dequantize_specs(lambda scheme: scheme.block_size is None)
        return Pipeline(legalize=legalize, lower=(steps,), finalize=("dce",))

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        from ...ir.traits import CALL, ops_with
        return LegalOps(interpretable_ops() - ops_with(CALL), _legal_check)

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> FPGAExecutable:
        return compile_module(module, target, options)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        loaded = program_files.from_files(files)
        preset = presets.from_dict(loaded.doc.get("preset"), "the artifact's preset")
        fnames = {fn.name for fn in module.functions}
        for p in loaded.programs:
            if p.function not in fnames:
                raise ArtifactError("target/" + program_files.INDEX, f"program for unknown function {p.function!r}")
            fn = module.function(p.function)
            misc = list(loaded.doc["misc_ops"])
            limits = isa.StreamLimits(len(misc), len(loaded.doc["layers"]), len(fn.nodes),
                                      {i: len(n.inputs) for i, n in enumerate(fn.nodes)},
                                      {misc.index(op): 1 for op in (KV_APPEND, ATTN_SOFTMAX) if op in misc})
            try:
                isa.validate(p.instrs, limits)
            except isa.ISAError as e:
                raise ArtifactError("target/" + program_files.STREAMS, f"{p.function} {p.bucket.key}: {e}") from None
        return FPGAExecutable(module, target, options, preset, loaded.doc, loaded.programs, loaded.image,
                              dict(files.items()) if hasattr(files, "items") else None)


def steps_of(module: Module, options: Mapping[str, Any]) -> LengthBuckets:
    main = next((fn for fn in module.functions if fn.attr(BUCKETS_ATTR) is not None), None)
    if main is not None:
        return LengthBuckets.from_attr(main.attr(BUCKETS_ATTR))
    max_len = _int_option(options, "max_length", 0) or min(2048, int(module.attr("max_positions", 2048) or 2048))
    return LengthBuckets(_int_option(options, "prefill_step", 1), _int_option(options, "kv_step", 1), max_len)


def compile_module(module: Module, target: str, options: Mapping[str, Any],
                   buckets: Sequence[Bucket] | None = None) -> FPGAExecutable:
    """Builds every bucket program (or only ``buckets``: the timing-only benchmark)."""
    preset = resolve_preset(target, options)
    steps = steps_of(module, options)
    ctx = build_context(module, preset)
    programs: list[Program] = []
    for fn in module.functions:
        for b in (buckets if buckets is not None else buckets_for(fn, module, steps)):
            programs.append(lower(ctx, fn, b, steps.kv_capacity))
    packed = program_files.pack(programs)
    doc = {"isa_version": 1, "preset": preset.to_json(), "misc_ops": ctx.misc_ops,
           "layers": [layer.to_json() for layer in ctx.layers],
           "image": {k: [a, list(s), d] for k, (a, s, d) in ctx.image.entries.items()},
           "image_size": ctx.image.size, "buckets": steps.to_json()}
    data = has_data(module)
    image = np.frombuffer(image_bytes(ctx), dtype=np.uint8) if data else None
    exe = FPGAExecutable(module, target, options, preset, doc, programs, image)
    stats = build_stats(exe, programs, packed, steps)
    if data:
        exe._files = program_files.to_files(exe.doc, programs, packed, image.tobytes(), stats)
    exe.doc["stats"] = stats
    return exe


def build_stats(exe: FPGAExecutable, programs: Sequence[Program], packed: program_files.Packed,
                steps: LengthBuckets) -> dict[str, Any]:
    """Instruction counts per queue, program bytes, buckets, simulated ms/token at sample lengths."""
    out: dict[str, Any] = {"preset": exe.preset.name, "buckets": len(programs),
                           **program_files.size_report(programs, packed, steps.max_length, steps.prefill_step,
                                                       steps.kv_step)}
    decode = [p for p in programs if p.bucket.phase == "decode"]
    prefill = [p for p in programs if p.bucket.phase == "prefill"]
    static = [p for p in programs if p.bucket.phase == "static"]
    samples = []
    if decode:
        pasts = sorted({p.bucket.past for p in decode})
        want = {pasts[0], pasts[len(pasts) // 2], pasts[-1]}
        samples += [p for p in decode if p.bucket.past in want]
    samples += prefill[:1] + static[:1]
    for p in samples:
        t = exe.timing(p)
        key = f"{p.function}@{p.bucket.key}"
        out[f"sim_ms {key}"] = round(t.seconds * 1e3, 4)
        out[f"instructions {key}"] = t.counts
    return out


__all__ = ["FPGABackend", "FPGAExecutable", "compile_module"]
