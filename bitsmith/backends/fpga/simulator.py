"""The accelerator simulator: cycle estimates per queue and, optionally, the numerics.

Timing (docs/fpga-isa.md, "Simulator model"): each queue runs its instructions in order; an
instruction starts when its queue is free and it holds one token from every queue in its wait
mask (tokens are released at the end of the producing instruction, per queue pair, matched in
order); its duration follows from the preset: LD/ST ``latency + bytes / sustained HBM bytes per
cycle over its channels``, MV/MM ``ceil(m/Pm) ceil(n/(Pn*SLR)) ceil(k/Pk)`` with k the kept
weights of a row (the sparse DSP chain skips pruned weights), MISC ``elements * passes /
(lanes * SLR)``. Energy sums stated per-operation constants.

Functional mode executes the instructions in the order of their simulated start times (so a
missing dependency flag reorders a consumer before its producer and changes the numbers):
MV/MM decode weight tiles with the unit's table and accumulate in float32; attention runs as
score tiles, a masked float32 softmax and value tiles; MISC instructions execute their IR
node's op with the reference semantics on the operand views. LD/ST move no data in this model
(operands are read at their plan addresses); they are timed, and their buffer slots order
producers and consumers.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from ...ir.interpreter import RULES, EvalContext
from ...ir.quant_grids import get_scheme
from ...ir.types import numpy_dtype
from . import isa
from .codegen import ATTN_SOFTMAX, KV_APPEND, MISC_PASSES, Bucket, concrete
from .memory import HBM, ONCHIP, View
from .presets import Preset
from .weights import FP32, Layer, decode_rows


class SimulationError(BitsmithError, RuntimeError):
    """A program the simulator cannot run (deadlock, bad address, ...), naming the instruction."""


@dataclass(frozen=True)
class ProgramInfo:
    """What the simulator needs besides the stream: the module's IR function (MISC/attention
    semantics and shapes), bindings, tables and layouts."""

    module: Any
    function: str
    bucket: Bucket
    layers: Sequence[Layer]
    misc_ops: Sequence[str]
    image_size: int
    kv_regions: Mapping[int, int]
    hbm_high: int
    onchip_high: int
    image_addrs: Mapping[str, int]

    @property
    def bindings(self) -> dict[str, int]:
        return {"batch": 1, "seq": self.bucket.seq, "past": self.bucket.past}


@dataclass
class Timing:
    start: list[int]
    end: list[int]
    cycles: int
    busy: dict[str, int]
    counts: dict[str, int]
    hbm_bytes: int
    macs: int
    misc_elements: int
    energy_j: float
    clock_hz: float

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    def summary(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "ms": round(self.seconds * 1e3, 6), "busy_cycles": dict(self.busy),
                "instructions": dict(self.counts), "hbm_bytes": self.hbm_bytes, "macs": self.macs,
                "misc_elements": self.misc_elements, "energy_mj": round(self.energy_j * 1e3, 6)}


def split_addr(field_value: int) -> tuple[int, int]:
    return (ONCHIP if field_value & isa.ONCHIP_BIT else HBM), (field_value & ~isa.ONCHIP_BIT) * isa.ADDR_UNIT


class _Costs:
    def __init__(self, preset: Preset, info: ProgramInfo) -> None:
        self.p, self.info = preset, info
        self.fn = info.module.function(info.function)
        self.types = self.fn.value_types()
        self.bytes = 0
        self.macs_int, self.macs_fp = 0, 0
        self.misc = 0

    def shape(self, value: str) -> tuple[int, ...]:
        return concrete(self.types[value], self.info.bindings)

    def matrix(self, unit: str, m: int, n: int, k: int) -> int:
        """Rows of activations in steps of Pm; the n x k weights of a tile spread over the
        Pn x Pk MACs of every SLR (a tile narrower than Pn*SLR rows splits K instead)."""
        u = self.p[unit]
        return math.ceil(m / u["m"]) * math.ceil(n * math.ceil(k / u["k"]) / (u["n"] * self.p["slr"]))

    def __call__(self, ins: isa.Instr) -> int:
        q = ins.queue
        if q in ("LD", "ST"):
            n = ins.get("length")
            self.bytes += n
            return int(self.p["hbm"]["latency_cycles"] + math.ceil(n / self.p.hbm_bytes_per_cycle(ins.get("channel") + 1)))
        if q in ("MV", "MM"):
            unit = q.lower()
            mode = isa.MATRIX_MODES[ins.get("mode")]
            m = ins.get("m")
            if mode == "weight":
                layer = self.info.layers[ins.get("ref")]
                n, k = ins.get("rows"), layer.kept
                if layer.fmt == FP32:
                    self.macs_fp += m * n * k
                else:
                    self.macs_int += m * n * k
                return self.matrix(unit, m, n, k)
            node = self.fn.nodes[ins.get("ref")]
            if mode == "matmul":
                n, k = ins.get("rows"), ins.get("kblocks") * 16
            else:
                _, _, t, d = self.shape(node.inputs[1])
                dv = self.shape(node.inputs[2])[-1]
                n, k = (t, d) if mode == "attn_qk" else (dv, t)
            self.macs_fp += m * n * k
            return self.matrix(unit, m, n, k)
        if q == "MISC":
            op = self.info.misc_ops[ins.get("misc_op")]
            node = self.fn.nodes[ins.get("node")]
            shape = self.shape(node.outputs[0].name)
            if op == ATTN_SOFTMAX:
                _, hq, s, _ = self.shape(node.inputs[0])
                shape = (hq, s, self.shape(node.inputs[1])[2])
            elif op == KV_APPEND:
                shape = self.shape(node.inputs[1])
            elems = int(np.prod(shape, dtype=np.int64))
            self.misc += elems
            lanes = self.p["misc"]["lanes"] * self.p["slr"]
            return 16 + math.ceil(elems * MISC_PASSES.get(op, 1) / lanes)
        return 1


def simulate_timing(instrs: Sequence[isa.Instr], info: ProgramInfo, preset: Preset) -> Timing:
    costs = _Costs(preset, info)
    dur = [costs(i) for i in instrs]
    latency = int(preset["hbm"]["latency_cycles"])
    n = len(instrs)
    start, end = [0] * n, [0] * n
    order = {q: [i for i, ins in enumerate(instrs) if ins.queue == q] for q in isa.QUEUES}
    ptr = {q: 0 for q in isa.QUEUES}
    free = {q: 0 for q in isa.QUEUES}
    tokens: dict[tuple[str, str], collections.deque] = collections.defaultdict(collections.deque)
    done = 0
    while done < n:
        progress = False
        for q in isa.QUEUES:
            lst = order[q]
            while ptr[q] < len(lst):
                idx = lst[ptr[q]]
                ins = instrs[idx]
                if any(not tokens[(p, q)] for p in ins.wait):
                    break
                t = free[q]
                for p in ins.wait:
                    t = max(t, tokens[(p, q)].popleft())
                d = dur[idx]
                if q in ("LD", "ST") and t == free[q] and t > 0:
                    d -= latency   # back-to-back requests: the access latency overlaps the previous transfer
                start[idx], end[idx] = t, t + d
                dur[idx] = d
                free[q] = end[idx]
                for c in ins.release:
                    tokens[(q, c)].append(end[idx])
                ptr[q] += 1
                done += 1
                progress = True
        if not progress:
            stuck = {q: order[q][ptr[q]] for q in isa.QUEUES if ptr[q] < len(order[q])}
            raise SimulationError(f"deadlock: queues wait for tokens nobody will release (next instructions "
                                  f"{stuck})")
    busy = {q: sum(dur[i] for i in order[q]) for q in isa.QUEUES}
    counts = {q: len(order[q]) for q in isa.QUEUES}
    cycles = max(end) if end else 0
    e = preset["energy_pj"]
    seconds = cycles / preset.clock_hz
    energy = (costs.bytes * (e["hbm_per_byte"] + e["sram_per_byte"]) + costs.macs_int * e["int8_mac"]
              + costs.macs_fp * e["fp32_mac"] + costs.misc * e["misc_per_element"]) * 1e-12 + e["static_w"] * seconds
    return Timing(start, end, cycles, busy, counts, costs.bytes, costs.macs_int + costs.macs_fp, costs.misc,
                  energy, preset.clock_hz)


class Memory:
    """The functional model's address spaces: the read-only constant image and per-call HBM
    and on-chip arrays."""

    def __init__(self, image: np.ndarray, info: ProgramInfo) -> None:
        self.image, self.info = image, info
        self.hbm = np.zeros(max(0, info.hbm_high - info.image_size), dtype=np.uint8)
        self.onchip = np.zeros(info.onchip_high, dtype=np.uint8)

    def _base(self, space: int, addr: int, nbytes: int, write: bool) -> tuple[np.ndarray, int]:
        if space == ONCHIP:
            arr, off = self.onchip, addr
        elif addr < self.info.image_size:
            if write:
                raise SimulationError(f"write into the constant image at {addr:#x}")
            arr, off = self.image, addr
        else:
            arr, off = self.hbm, addr - self.info.image_size
        if off < 0 or off + nbytes > arr.size:
            raise SimulationError(f"access [{addr:#x}, +{nbytes}) outside its space ({arr.size} bytes)")
        return arr, off

    def view(self, space: int, addr: int, shape: tuple[int, ...], dtype: str, write: bool = False) -> np.ndarray:
        dt = np.dtype(numpy_dtype(dtype))
        cap = self.info.kv_regions.get(addr) if space == HBM else None
        if cap is not None and len(shape) == 4:
            b, h, t, d = shape
            strides = (h * cap * d, cap * d, d, 1)
        else:
            strides = View.contiguous(space, addr, shape, dtype).strides
        if any(st < 0 for st in strides) or any(n < 0 for n in shape):
            raise SimulationError(f"view at {addr:#x} has negative strides {strides} or shape {shape}")
        extent = View(space, addr, shape, strides, dtype).extent
        arr, off = self._base(space, addr, extent, write)
        raw = arr[off:off + extent]
        base = raw.view(dt) if extent % dt.itemsize == 0 and extent else np.zeros(0, dt)
        return np.lib.stride_tricks.as_strided(base, shape, tuple(s * dt.itemsize for s in strides),
                                               writeable=write)


class Functional:
    """Executes instructions on ``Memory``; decoded weights are cached per layer (``cache``)."""

    def __init__(self, info: ProgramInfo, mem: Memory, decoded: dict[int, np.ndarray], kv_valid: int) -> None:
        self.info, self.mem, self.decoded = info, mem, decoded
        self.fn = info.module.function(info.function)
        self.types = self.fn.value_types()
        self.kv_valid = kv_valid
        self.ctx = EvalContext(info.module, info.bindings)

    def shape(self, value: str) -> tuple[int, ...]:
        return concrete(self.types[value], self.info.bindings)

    def read_value(self, addr_field: int, value: str) -> np.ndarray:
        space, addr = split_addr(addr_field)
        return self.mem.view(space, addr, self.shape(value), self.types[value].dtype)

    def write(self, addr_field: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        space, addr = split_addr(addr_field)
        return self.mem.view(space, addr, shape, dtype, write=True)

    def weight(self, lid: int) -> np.ndarray:
        w = self.decoded.get(lid)
        if w is None:
            layer = self.info.layers[lid]
            arrays = {}
            for s in layer.sections:
                arrays[s.role] = self.mem.view(HBM, self.image_addr(s.tensor), s.shape, s.dtype)
            w = decode_rows(layer, arrays, slice(None))
            self.decoded[lid] = w
        return w

    def image_addr(self, tensor: str) -> int:
        return self.info.image_addrs[tensor]

    def __call__(self, ins: isa.Instr) -> None:
        q = ins.queue
        if q in ("MV", "MM"):
            getattr(self, "_" + isa.MATRIX_MODES[ins.get("mode")])(ins)
        elif q == "MISC":
            self._misc(ins)

    def _weight(self, ins: isa.Instr) -> None:
        lid = ins.get("ref")
        layer = self.info.layers[lid]
        m, r0, r = ins.get("m"), ins.get("row0"), ins.get("rows")
        sa, aa = split_addr(ins.get("a_addr"))
        x = self.mem.view(sa, aa, (m, layer.in_features), "float32")
        w = self.weight(lid)[r0:r0 + r]
        y = np.matmul(x, w.T)
        if layer.bias is not None:
            b = self.mem.view(HBM, self.image_addr(layer.bias.tensor), layer.bias.shape, layer.bias.dtype)
            y = y + b[r0:r0 + r].astype(np.float32)
        out = self.write(ins.get("out_addr"), (m, layer.out_features), "float32")
        out[:, r0:r0 + r] = y

    def _matmul(self, ins: isa.Instr) -> None:
        node = self.fn.nodes[ins.get("ref")]
        a = self.read_value(ins.get("a_addr"), node.inputs[0]).astype(np.float32)
        b = self.read_value(ins.get("row0"), node.inputs[1]).astype(np.float32)
        y = np.matmul(a, np.swapaxes(b, -1, -2)) if node.op == "linear" else np.matmul(a, b)
        out_v = node.outputs[0]
        self.write(ins.get("out_addr"), self.shape(out_v.name), out_v.type.dtype)[...] = y

    def _attn_parts(self, ins: isa.Instr) -> tuple[Any, int, int, int, int, int]:
        node = self.fn.nodes[ins.get("ref")]
        _, hq, s, d = self.shape(node.inputs[0])
        _, hk, t, dv = self.shape(node.inputs[2])
        return node, hq // hk, s, t, d, hk

    def _attn_qk(self, ins: isa.Instr) -> None:
        node, g, s, t, d, hk = self._attn_parts(ins)
        h = ins.get("rows")
        q = self.read_value(ins.get("a_addr"), node.inputs[0])
        k = self.read_value(ins.get("row0"), node.inputs[1])
        qg = q[0, h * g:(h + 1) * g].reshape(g * s, d).astype(np.float32) * np.float32(node.attr("scale"))
        scores = self.write(ins.get("out_addr"), (hk, g * s, t), "float32")
        scores[h] = np.matmul(qg, k[0, h].astype(np.float32).T)

    def _attn_sv(self, ins: isa.Instr) -> None:
        node, g, s, t, d, hk = self._attn_parts(ins)
        h = ins.get("rows")
        sa, aa = split_addr(ins.get("a_addr"))
        p = self.mem.view(sa, aa, (hk, g * s, t), "float32")
        v = self.read_value(ins.get("row0"), node.inputs[2])
        dv = v.shape[-1]
        out = self.write(ins.get("out_addr"), (1, g * hk, s, dv), node.outputs[0].type.dtype)
        out[0, h * g:(h + 1) * g] = np.matmul(p[h], v[0, h].astype(np.float32)).reshape(g, s, dv)

    def _misc(self, ins: isa.Instr) -> None:
        op = self.info.misc_ops[ins.get("misc_op")]
        node = self.fn.nodes[ins.get("node")]
        if op == KV_APPEND:
            new = self.read_value(ins.inputs[0], node.inputs[1])
            out = self.write(ins.get("out_addr"), self.shape(node.outputs[0].name), "float32")
            p = self.info.bucket.past
            out[:, :, p:p + new.shape[2]] = new
            return
        if op == ATTN_SOFTMAX:
            self._softmax(ins, node)
            return
        if op != node.op:
            raise SimulationError(f"MISC op {op} on a {node.op} node (node {ins.get('node')})")
        xs = [self.read_value(a, v) for a, v in zip(ins.inputs, node.inputs)]
        (y,) = RULES[op](xs, node, self.ctx)[:1]
        out_v = node.outputs[0]
        self.write(ins.get("out_addr"), self.shape(out_v.name), out_v.type.dtype)[...] = y

    def _softmax(self, ins: isa.Instr, node: Any) -> None:
        _, hq, s, _ = self.shape(node.inputs[0])
        hk, t = self.shape(node.inputs[1])[1], self.shape(node.inputs[1])[2]
        g = hq // hk
        sc = self.write(ins.get("out_addr"), (hk, g, s, t), "float32")
        allowed = np.ones((s, t), dtype=bool)
        if node.attr("causal"):
            allowed &= np.arange(t)[None, :] <= np.arange(s)[:, None] + (t - s)
        if ins.get("mask"):
            allowed[:, self.kv_valid:self.info.bucket.past] = False
        x = np.where(allowed, sc, np.float32(-np.inf))
        mx = x.max(axis=-1, keepdims=True)
        mx[~np.isfinite(mx)] = 0
        e = np.exp(x - mx)
        sc[...] = e / e.sum(axis=-1, keepdims=True)


def run_functional(instrs: Sequence[isa.Instr], timing: Timing, info: ProgramInfo, image: np.ndarray,
                   decoded: dict[int, np.ndarray], inputs: Sequence[tuple[View, np.ndarray]],
                   kv_valid: int) -> Memory:
    """Writes ``inputs`` at their views, executes ``instrs`` in simulated start order, returns
    the memory for the caller to read results from."""
    mem = Memory(image, info)
    for view, arr in inputs:
        mem.view(view.space, view.addr, view.shape, view.dtype, write=True)[...] = arr
    fn = Functional(info, mem, decoded, kv_valid)
    for idx in sorted(range(len(instrs)), key=lambda i: (timing.start[i], i)):
        fn(instrs[idx])
    return mem
