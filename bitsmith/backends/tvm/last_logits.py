"""Prefill that computes logits of the last position only: a variant of the in-place KV plan.

Generation needs the logits after the prompt's last token, but ``main`` projects every position
onto the vocabulary: for SmolLM2-135M a 512-token prompt spends ~17% of its prefill time in the
lm_head (29 GFLOP of 49152 x 576) and writes 100 MB of logits nobody reads. llama.cpp computes
the output rows it needs only. The variant derived here from ``kv_inplace``'s plan takes, right
before the lm_head, row ``seq - 1`` of every batch row (``take_last``, a copy kernel) and runs
the lm_head and the views after it on those rows: logits [batch, 1, vocab]. The lm_head kernel
then takes its M = 1 path (a decode step's), which sums in another order than its M-tiled one:
the values equal the full variant's last position to float rounding, not bit for bit (SmolLM2,
Q8_0 lm_head: max |difference| 1.6e-5 on logits of magnitude ~20). Rows are left-padded
(docs/ragged-batches.md), so position ``seq - 1`` is every row's last token.

Perplexity needs every position and keeps the full variant; ``KVSession.step(last_only=True)``
picks this one (plan.json ``kv_inplace_last``; artifacts without it slice the full logits).
"""

from __future__ import annotations

import copy
from typing import Any

from tvm.script import tirx as T

from ...errors import BitsmithError
from ...ir import symbolic as sym
from .kernel import KernelDef, Recipe
from .plan import EXTERN_PREFIX, Call, FunctionPlan, View

KEY = "main:kv-inplace-last"     # the variant's executor key (``HostBuild.executors``)
PLAN_FIELD = "kv_inplace_last"   # plan.json: [variant plan], absent in older artifacts
SEQ = "seq"
PROJECTIONS = ("gemv", "qgemv")  # kernel kinds of a linear layer (dense, quantized), row by row


class LastLogitsUnavailable(BitsmithError):
    """The plan's logits are not a per-position projection the variant can cut (says why)."""


def take_last_kernel(dtype: str) -> KernelDef:
    return KernelDef(f"take_last_position_{dtype}", Recipe(take_last_func, (str(dtype),)), "injective")


def take_last_func(dtype: str) -> Any:
    @T.prim_func(s_tir=True)
    def take_last(var_x: T.handle, var_out: T.handle):
        b, s, d = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(var_x, (b, s, d), dtype)
        out = T.match_buffer(var_out, (b, T.int64(1), d), dtype)
        for bi, di in T.grid(b, d):
            with T.sblock("take"):
                vb, vd = T.axis.remap("SS", [bi, di])
                out[vb, T.int64(0), vd] = x[vb, s - T.int64(1), vd]

    return take_last


def derive_plan(plan: FunctionPlan, kernels: dict[str, KernelDef]) -> FunctionPlan:
    """The last-position variant of ``plan`` (the in-place variant: logits its only result).
    ``take_last`` is added to ``kernels`` (digest -> KernelDef, holding every kernel the plan
    calls). LastLogitsUnavailable where the logits do not come from one linear kernel (kind
    PROJECTIONS, or an extern step: the LUT engine's linears) over [batch, seq, d] activations
    through views only: anything else after the lm_head (a soft-cap, a scale) or a kernel that
    might mix positions is not cut."""
    if len(plan.results) != 1:
        raise LastLogitsUnavailable(f"the plan has {len(plan.results)} results, not just the logits")
    steps = plan.steps
    producer: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for k, s in enumerate(steps):
        for i in (s.inputs if isinstance(s, Call) else [s.src]):
            readers.setdefault(i, []).append(k)
        for slot in ([o[0] for o in s.outputs] if isinstance(s, Call) else [s.dst]):
            producer[slot] = k
    consts = {c.slot for c in plan.consts}

    def shape_of(slot: int) -> list:
        s = steps[producer[slot]]
        return plan.shapes[s.shape if isinstance(s, View) else next(o[1] for o in s.outputs if o[0] == slot)]

    # from the logits back through views to the projection, then through views to its input
    chain: list[int] = []  # step indices from the cut point to the result, in order
    slot = plan.results[0]
    while slot in producer and isinstance(steps[producer[slot]], View):
        chain.append(producer[slot])
        slot = steps[producer[slot]].src
    if slot not in producer:
        raise LastLogitsUnavailable("the logits are not computed by a kernel")
    proj = producer[slot]
    chain.append(proj)
    call = steps[proj]
    kind = "extern" if call.kernel.startswith(EXTERN_PREFIX) else getattr(kernels.get(call.kernel), "kind", None)
    if kind not in PROJECTIONS + ("extern",):
        raise LastLogitsUnavailable(f"the logits come from {call.name or call.kernel!r} (kind {kind}), not a linear kernel")
    acts = [i for i in call.inputs if i not in consts and i not in plan.params]
    if len(call.outputs) != 1 or len(acts) != 1 or call.inputs[0] != acts[0]:
        raise LastLogitsUnavailable(f"the logits' kernel {call.name!r} does not take one activation input first")
    slot = acts[0]
    while slot in producer and isinstance(steps[producer[slot]], View):
        chain.append(producer[slot])
        slot = steps[producer[slot]].src
    chain.reverse()
    if slot not in producer:
        raise LastLogitsUnavailable("the lm_head's input is not computed by a kernel")
    dims = shape_of(slot)
    if len(dims) != 3 or dims[1] != SEQ or not isinstance(dims[2], int):
        raise LastLogitsUnavailable(f"the lm_head's input has shape {dims}, not [batch, seq, d]")
    for k in chain:  # every slot on the chain feeds only the next step: shapes may change
        s = steps[k]
        out = s.dst if isinstance(s, View) else s.outputs[0][0]
        if k != chain[-1] and len(readers.get(out, [])) != 1:
            raise LastLogitsUnavailable(f"slot {out} between the lm_head's input and the logits has other readers")
    dtype = next(o[2] for o in steps[producer[slot]].outputs if o[0] == slot)

    out = copy.deepcopy(plan)
    shapes = [list(s) for s in out.shapes]

    def shape_id(d: list) -> int:
        if d not in shapes:
            shapes.append(d)
        return shapes.index(d)

    def one_row(sid: int) -> int:
        return shape_id([sym.canonical(sym.substitute(x, {SEQ: 1})) for x in shapes[sid]])

    kdef = take_last_kernel(dtype)
    kernels.setdefault(kdef.digest(), kdef)
    last = out.num_slots
    take = Call(kdef.digest(), [slot], [(last, shape_id([dims[0], 1, dims[2]]), dtype)], None, kdef.name)
    first = out.steps[chain[0]]
    if isinstance(first, View):
        first.src = last
    else:
        first.inputs = [last if i == slot else i for i in first.inputs]
    for k in chain:
        s = out.steps[k]
        if isinstance(s, View):
            s.shape = one_row(s.shape)
        else:
            s.outputs = [(o[0], one_row(o[1]), o[2]) for o in s.outputs]
    out.steps.insert(chain[0], take)
    out.shapes = shapes
    out.num_slots = last + 1
    out.check()
    return out
