"""Code generation: one IR function at one length bucket -> an instruction stream + its plan.

Each node becomes instructions (docs/fpga-isa.md, "Lowering"):
  * ``linear``/``qlinear`` on a constant weight: per row tile, LD of the tile's sections into
    one of two B/META/SCALE slots (double buffering), then MV (one activation row) or MM;
  * ``attention``: per key/value head LD K, MV/MM ``attn_qk`` into a score block, one MISC
    ``attn_softmax`` (causal mask, and in decode the key-padding mask of the bucket), per head
    LD V and MV/MM ``attn_sv``;
  * ``concat(past_*, new)`` of the kv-cache pass: MISC ``kv_append`` writing the new rows in
    place into the KV region;
  * ``reshape`` of a contiguous value: no instruction (a view of the same bytes);
  * everything else: one MISC instruction executing that IR node's op on the vector unit.
Activations of a decode program stay on chip when they fit; a prefill program keeps them in
HBM and surrounds compute with LD/ST of its operands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ...errors import UnsupportedOpError
from ...ir import Function, Module, Node
from ...ir import symbolic as sym
from ...ir.length_buckets import Bucket
from ...ir.traits import GATHER, has_trait
from . import isa
from .deps import Tracker, assign_flags
from .memory import HBM, ONCHIP, Arena, View, align
from .presets import Preset
from .weights import FP32, Layer

TARGET_NAME = "fpga"
KV_APPEND, ATTN_SOFTMAX = "kv_append", "attn_softmax"
MATRIX_OPS = frozenset({"linear", "qlinear", "matmul", "attention"})
MISC_PASSES = {"softmax": 3, ATTN_SOFTMAX: 3, "layer_norm": 2, "mean": 1, "sum": 1}
STAGE_BUFFERS = ("B", "META", "SCALE")



@dataclass
class Image:
    """The HBM constant image: tensor name -> (address, shape, dtype)."""

    entries: dict[str, tuple[int, tuple[int, ...], str]] = field(default_factory=dict)
    size: int = 0

    def add(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        if name not in self.entries:
            self.entries[name] = (self.size, tuple(shape), dtype)
            self.size = align(self.size + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return self.entries[name][0]


@dataclass
class Program:
    function: str
    bucket: Bucket
    instrs: list[isa.Instr]
    params: list[View]
    results: list[View]
    kv: dict[int, int]            # result index -> past param index (results read back unpadded)
    kv_regions: dict[int, int]    # KV region address -> rows per head (capacity)
    hbm_high: int
    onchip_high: int


@dataclass
class ModuleContext:
    """What every bucket program of a module shares: the constant image, the layer table and
    the MISC op table."""

    module: Module
    preset: Preset
    image: Image
    layers: list[Layer]
    layer_index: dict[tuple[str, str], int]   # (function, weight value name) -> layer id
    misc_ops: list[str]

    def misc_code(self, op: str) -> int:
        return self.misc_ops.index(op)


def concrete(t: Any, bindings: dict[str, int]) -> tuple[int, ...]:
    return tuple(sym.evaluate(d, bindings) for d in t.shape)


class Lowering:
    def __init__(self, ctx: ModuleContext, fn: Function, bucket: Bucket, kv_capacity: int = 0) -> None:
        """``kv_capacity``: rows per head of every KV region and score block, the same for all
        buckets so that their streams differ only in lengths and loop counts (0: this bucket's)."""
        self.ctx, self.fn, self.bucket = ctx, fn, bucket
        self.kv_capacity = kv_capacity
        self.preset = ctx.preset
        self.act_bytes = int(self.preset["hbm"].get("act_bytes", 2))
        self.bindings = {"batch": 1, "seq": bucket.seq, "past": bucket.past}
        self.types = fn.value_types()
        self.tracker = Tracker()
        self.instrs: list[isa.Instr] = []
        self.views: dict[str, View] = {}
        self.rid: dict[str, int | None] = {}
        self.alloc_users: dict[int, int] = {}
        self.hbm = Arena(align(ctx.image.size), None)
        onchip_cap = self.preset.buffer_bytes("A") + self.preset.buffer_bytes("GLOBAL")
        self.onchip = Arena(0, onchip_cap) if bucket.phase == "decode" else None
        self.slots = {b: [self.tracker.resource(), self.tracker.resource()] for b in STAGE_BUFFERS + ("KV",)}
        self.slot_turn = {b: 0 for b in self.slots}
        self.kv_regions: dict[int, int] = {}
        self.kv_result: dict[str, int] = {}
        self.node_index = {n.outputs[0].name: i for i, n in enumerate(fn.nodes)}

    # ---------------------------------------------------------------- helpers

    def shape(self, value: str) -> tuple[int, ...]:
        return concrete(self.types[value], self.bindings)

    def fail(self, node: Node, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError.at(node, target=TARGET_NAME, function=self.fn.name, detail=detail)

    def emit(self, ins: isa.Instr, reads: list[int | None], writes: list[int | None]) -> int:
        self.instrs.append(ins)
        return self.tracker.add(ins.queue, [r for r in reads if r is not None], [w for w in writes if w is not None])

    def place(self, value: str, prefer_onchip: bool = True) -> View:
        shape, dtype = self.shape(value), self.types[value].dtype
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        got = self.onchip.alloc(nbytes) if (self.onchip is not None and prefer_onchip) else None
        space, arena = (ONCHIP, self.onchip) if got is not None else (HBM, self.hbm)
        if got is None:
            got = self.hbm.alloc(nbytes)
        addr, prev = got
        view = View.contiguous(space, addr, shape, dtype)
        rid = self.tracker.resource(prev)
        self.views[value], self.rid[value] = view, rid
        self.alloc_users[rid] = self.alloc_users.get(rid, 0) + 1
        self._arena_of = getattr(self, "_arena_of", {})
        self._arena_of[rid] = (arena, addr, nbytes)
        return view

    def release(self, value: str) -> None:
        rid = self.rid.get(value)
        if rid is None or rid not in self.alloc_users:
            return
        self.alloc_users[rid] -= 1
        if self.alloc_users[rid] == 0:
            arena, addr, nbytes = self._arena_of[rid]
            arena.release(addr, nbytes, rid)

    def stage(self, buf: str) -> int:
        t = self.slot_turn[buf]
        self.slot_turn[buf] = 1 - t
        return self.slots[buf][t]

    def ld(self, buf: str, hbm_addr: int, length: int, reads: list[int | None], slot: int, channels: int) -> None:
        self.emit(isa.make("LD", buffer=isa.BUFFERS.index(buf), channel=max(0, min(channels, 32) - 1),
                           hbm_addr=hbm_addr // isa.ADDR_UNIT, buf_addr=0, length=max(1, length)), reads, [slot])

    def st(self, value: str) -> None:
        v = self.views[value]
        n = int(np.prod(v.shape, dtype=np.int64)) * self.act_bytes
        self.emit(isa.make("ST", buffer=isa.BUFFERS.index("A"), channel=self.preset["hbm"]["act_channels"] - 1,
                           hbm_addr=v.addr // isa.ADDR_UNIT, buf_addr=0, length=max(1, n)),
                  [self.rid[value]], [])

    def addr_field(self, view: View) -> int:
        return view.addr // isa.ADDR_UNIT | (isa.ONCHIP_BIT if view.space == ONCHIP else 0)

    def load_operand(self, value: str, gather_rows: int | None = None) -> None:
        """LD of an HBM operand into the A buffer (timing), counting activation bytes."""
        v = self.views[value]
        if v.space != HBM:
            return
        count = int(np.prod(v.shape, dtype=np.int64))
        if gather_rows is not None:
            count = gather_rows * v.shape[-1]
        self.ld("A", v.addr, count * self.act_bytes, [self.rid.get(value)], self.a_slot(),
                self.preset["hbm"]["act_channels"])

    def a_slot(self) -> int:
        if not hasattr(self, "_a_slot"):
            self._a_slot = self.tracker.resource()
        return self._a_slot

    # ---------------------------------------------------------------- lowering

    def run(self) -> Program:
        fn = self.fn
        last_use: dict[str, int] = {}
        for i, n in enumerate(fn.nodes):
            for v in n.inputs:
                last_use[v] = i
        keep = set(fn.results)
        past_params = [p.name for p in fn.params if p.name.startswith("past_")]
        for p in fn.params:
            if p.name in past_params:
                continue
            self.views[p.name] = View.contiguous(HBM, self.hbm.alloc(
                int(np.prod(self.shape(p.name), dtype=np.int64)) * np.dtype(p.type.dtype).itemsize)[0],
                self.shape(p.name), p.type.dtype)
            self.rid[p.name] = self.tracker.resource()
        self._plan_kv(past_params)
        for i, node in enumerate(fn.nodes):
            self.lower_node(i, node)
            for v in set(node.inputs):
                if last_use.get(v) == i and v not in keep:
                    self.release(v)
        for r in fn.results:
            if self.views[r].space == ONCHIP:
                self.st(r)
        flagged = assign_flags(self.instrs, self.tracker.graph)
        params = [self.views[p.name] for p in fn.params]
        results = [self.views[r] for r in fn.results]
        kv = {i: past_params.index(self.kv_result[r]) + (len(fn.params) - len(past_params))
              for i, r in enumerate(fn.results) if r in self.kv_result}
        return Program(fn.name, self.bucket, flagged, params, results, kv, dict(self.kv_regions),
                       self.hbm.high, self.onchip.high if self.onchip is not None else 0)

    def _plan_kv(self, past_params: list[str]) -> None:
        users = self.fn.users()
        for p in past_params:
            uses = users.get(p, [])
            if len(uses) != 1 or uses[0].op != "concat" or uses[0].inputs[0] != p or uses[0].attr("axis") != 2:
                raise UnsupportedOpError("concat", target=TARGET_NAME, function=self.fn.name,
                                         detail=f"cache input %{p} must feed exactly one concat(past, new) on "
                                                f"axis 2 (the kv-cache pass's form)")
            node = uses[0]
            present = node.outputs[0].name
            b, h, t, d = self.shape(present)
            cap = max(t, self.kv_capacity)
            addr, _ = self.hbm.alloc(b * h * cap * d * 4)
            strides = (h * cap * d, cap * d, d, 1)
            self.views[p] = View(HBM, addr, self.shape(p), strides, "float32")
            self.views[present] = View(HBM, addr, (b, h, t, d), strides, "float32")
            rid = self.tracker.resource()
            self.rid[p] = self.rid[present] = rid
            self.kv_regions[addr] = cap
            self.kv_result[present] = p

    def lower_node(self, i: int, node: Node) -> None:
        op, out = node.op, node.outputs[0].name
        if op == "constant":
            name = node.attr("name")
            addr, shape, dtype = self.ctx.image.entries[name]
            self.views[out] = View.contiguous(HBM, addr, shape, dtype)
            self.rid[out] = None
        elif op == "reshape" and self.views[node.inputs[0]].is_contiguous:
            src = node.inputs[0]
            self.views[out] = self.views[src].with_shape(self.shape(out))
            self.rid[out] = self.rid[src]
            if self.rid[src] in self.alloc_users:
                self.alloc_users[self.rid[src]] += 1
        elif op == "concat" and node.inputs[0] in self.kv_result.values():
            self.lower_kv_append(i, node)
        elif op in ("linear", "qlinear") and (self.fn.name, node.inputs[1]) in self.ctx.layer_index:
            self.lower_weight_matrix(i, node)
        elif op == "attention":
            self.lower_attention(i, node)
        elif op in ("linear", "matmul"):
            self.lower_act_matrix(i, node)
        else:
            self.lower_misc(i, node, op)

    def lower_misc(self, i: int, node: Node, op: str) -> None:
        out = node.outputs[0].name
        if len(node.outputs) != 1:
            raise self.fail(node, "the MISC unit writes one result per instruction")
        gather = has_trait(op, GATHER)
        for k, v in enumerate(node.inputs):
            rows = int(np.prod(self.shape(node.inputs[1]), dtype=np.int64)) if gather and k == 0 else None
            self.load_operand(v, rows)
        view = self.place(out, prefer_onchip=True)
        ins = isa.make("MISC", [self.addr_field(self.views[v]) for v in node.inputs],
                       misc_op=self.ctx.misc_code(op), node=i, out_addr=self.addr_field(view))
        self.emit(ins, [self.rid.get(v) for v in node.inputs] + [self.a_slot()], [self.rid[out]])
        if view.space == HBM:
            self.st(out)

    def lower_kv_append(self, i: int, node: Node) -> None:
        out, new = node.outputs[0].name, node.inputs[1]
        view = self.views[out]
        ins = isa.make("MISC", [self.addr_field(self.views[new])], misc_op=self.ctx.misc_code(KV_APPEND), node=i,
                       out_addr=self.addr_field(view))
        self.emit(ins, [self.rid.get(new)], [self.rid[out]])

    def matrix_queue(self, m: int) -> str:
        return "MV" if m == 1 else "MM"

    def tile_rows(self, layer: Layer) -> int:
        per = layer.tile_bytes(1)
        limit = layer.out_features
        slr = int(self.preset["slr"])   # each SLR has its own B/META/SCALE banks and takes a slice of the rows
        for buf, b in per.items():
            if b:
                limit = min(limit, max(1, self.preset.buffer_bytes(buf) * slr // 2 // b))
        unit = int(self.preset["mv"]["n"]) * int(self.preset["slr"])
        return limit // unit * unit if limit >= unit else limit

    def lower_weight_matrix(self, i: int, node: Node) -> None:
        x, out = node.inputs[0], node.outputs[0].name
        lid = self.ctx.layer_index[(self.fn.name, node.inputs[1])]
        layer = self.ctx.layers[lid]
        xs = self.shape(x)
        m = int(np.prod(xs[:-1], dtype=np.int64))
        if m >= 1 << 16:
            raise self.fail(node, f"{m} activation rows exceed the m field (65535)")
        self.load_operand(x)
        view = self.place(out)
        rows = self.tile_rows(layer)
        nm = layer.nm
        queue = self.matrix_queue(m)
        kblocks = math.ceil(layer.kept / 16)
        for r0 in range(0, layer.out_features, rows):
            r = min(rows, layer.out_features - r0)
            slots = {}
            for buf in STAGE_BUFFERS:
                slots[buf] = self.stage(buf)
            for s in layer.sections + ((layer.bias,) if layer.bias is not None else ()):
                buf = {"nm_index": "META", "scales": "SCALE", "zeros": "SCALE", "selectors": "SCALE",
                       "bias": "SCALE"}.get(s.role, "B")
                addr = self.ctx.image.entries[s.tensor][0]
                row_bytes = s.row_bytes if s.role != "bias" else np.dtype(s.dtype).itemsize
                self.ld(buf, addr + r0 * row_bytes, r * row_bytes, [], slots[buf],
                        self.preset["hbm"]["weight_channels"])
            ins = isa.make(queue, fmt=0, nm_n=nm[0] if nm else 0, nm_mlog2=int(math.log2(nm[1])) if nm else 0,
                           bias=int(layer.bias is not None), mode=isa.MATRIX_MODES.index("weight"), ref=lid,
                           rows=r, row0=r0, a_addr=self.addr_field(self.views[x]), out_addr=self.addr_field(view),
                           m=m, kblocks=kblocks)
            self.emit(ins, [self.rid.get(x), self.a_slot()] + list(slots.values()), [self.rid[out]])
        if view.space == HBM:
            self.st(out)

    def lower_act_matrix(self, i: int, node: Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        out = node.outputs[0].name
        if len(node.inputs) != 2:
            raise self.fail(node, "a linear with a non-constant weight and a bias is not supported")
        self.load_operand(a)
        self.load_operand(b)
        view = self.place(out)
        shp = self.shape(out)
        m = int(np.prod(shp[:-1], dtype=np.int64))
        k = self.shape(a)[-1]
        ins = isa.make(self.matrix_queue(m), mode=isa.MATRIX_MODES.index("matmul"), ref=i & 0xFFFF, rows=shp[-1],
                       row0=self.addr_field(self.views[b]), a_addr=self.addr_field(self.views[a]),
                       out_addr=self.addr_field(view), m=min(m, 0xFFFF), kblocks=math.ceil(k / 16))
        if i >= 1 << 16:
            raise self.fail(node, "node index beyond the ref field (65535)")
        self.emit(ins, [self.rid.get(a), self.rid.get(b), self.a_slot()], [self.rid[out]])
        if view.space == HBM:
            self.st(out)

    def lower_attention(self, i: int, node: Node) -> None:
        if len(node.inputs) != 3:
            raise self.fail(node, f"attention with {len(node.inputs)} inputs (a key-padding mask) is not "
                                  f"supported by the fpga lowering; it takes q, k, v")
        if i >= 1 << 16:
            raise self.fail(node, "node index beyond the ref field (65535)")
        q, k, v = node.inputs
        out = node.outputs[0].name
        _, hq, s, d = self.shape(q)
        _, hk, t, dv = self.shape(v)
        g = hq // hk
        self.load_operand(q)
        scores_val = f"{out}.scores"
        self.types[scores_val] = type(self.types[out])((hk, g * s, max(t, self.kv_capacity)), "float32")
        scores = self.place(scores_val)
        view = self.place(out)
        queue = self.matrix_queue(s)
        kvv, vvv = self.views[k], self.views[v]
        kv_ch = self.preset["hbm"]["kv_channels"]
        for h in range(hk):
            slot = self.stage("KV")
            self.ld("KV", kvv.addr + h * kvv.strides[1] * 4, t * d * self.act_bytes, [self.rid.get(k)], slot, kv_ch)
            ins = isa.make(queue, mode=isa.MATRIX_MODES.index("attn_qk"), ref=i, rows=h, row0=self.addr_field(kvv),
                           a_addr=self.addr_field(self.views[q]), out_addr=self.addr_field(scores), m=g * s,
                           kblocks=math.ceil(d / 16))
            self.emit(ins, [self.rid.get(q), self.rid.get(k), slot, self.a_slot()], [self.rid[scores_val]])
        mask = int(self.bucket.phase == "decode")
        sm = isa.make("MISC", [self.addr_field(scores)], misc_op=self.ctx.misc_code(ATTN_SOFTMAX), node=i,
                      out_addr=self.addr_field(scores), mask=mask)
        self.emit(sm, [self.rid[scores_val]], [self.rid[scores_val]])
        for h in range(hk):
            slot = self.stage("KV")
            self.ld("KV", vvv.addr + h * vvv.strides[1] * 4, t * dv * self.act_bytes, [self.rid.get(v)], slot, kv_ch)
            ins = isa.make(queue, mode=isa.MATRIX_MODES.index("attn_sv"), ref=i, rows=h, row0=self.addr_field(vvv),
                           a_addr=self.addr_field(scores), out_addr=self.addr_field(view), m=g * s,
                           kblocks=math.ceil(t / 16))
            self.emit(ins, [self.rid[scores_val], self.rid.get(v), slot], [self.rid[out]])
        self.release(scores_val)
        if view.space == HBM:
            self.st(out)


def lower(ctx: ModuleContext, fn: Function, bucket: Bucket, kv_capacity: int = 0) -> Program:
    return Lowering(ctx, fn, bucket, kv_capacity).run()


ProgressFn = Callable[[int, int], None]
