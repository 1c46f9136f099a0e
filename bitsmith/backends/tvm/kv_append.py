"""The ``kv_append`` kernel: writes a decode step's new key (or value) into a fixed-capacity cache, in place.

Device-resident decode (``cuda_decode``) keeps each layer's past keys in a buffer of fixed
capacity so that every step touches the same addresses (what a captured CUDA graph needs).
The plan's ``main`` still builds ``present = concat(past, new)``; this kernel copies the new
entry, ``present[:, :, t - 1]``, to ``past[:, :, slot[b]]``. The slot comes from a device
buffer (so one recorded launch serves every step); the host checks it is inside
``[0, t - 1)`` before writing it there. Every dim is dynamic: one kernel per cache dtype.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .kernel import KernelDef

KIND = "injective"


def kv_append_kernel(dtype: str) -> KernelDef:
    """past[b, h, slot[b], d] = present[b, h, t - 1, d] for every b, h, d."""

    @T.prim_func(s_tir=True)
    def kv_append(var_present: T.handle, var_slot: T.handle, var_past: T.handle):
        b, h, t, d = T.int64(), T.int64(), T.int64(), T.int64()
        present = T.match_buffer(var_present, (b, h, t, d), dtype)
        slot = T.match_buffer(var_slot, (b,), "int64")
        past = T.match_buffer(var_past, (b, h, t - T.int64(1), d), dtype)
        for bi, hi, di in T.grid(b, h, d):
            with T.sblock("append"):
                vb, vh, vd = T.axis.remap("SSS", [bi, hi, di])
                past[vb, vh, slot[vb], vd] = present[vb, vh, t - T.int64(1), vd]

    return KernelDef(f"kv_append_{dtype}", kv_append, KIND)
