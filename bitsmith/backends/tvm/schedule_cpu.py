"""CPU (llvm) schedules, chosen by a KernelDef's ``kind``.

* ``fused`` / ``injective``: left as TE builds them (one loop nest per materialised stage);
  whether a block is large enough to pay for a thread-pool launch is not known statically,
  so only the attention and matmul kernels go parallel; LLVM vectorises the inner loops.
* ``attention``: ``attention_cpu``'s hand-vectorized kernel (one task per batch row, kv head
  and query row, all query heads of the group together) where head and value dims are
  multiples of 16; else the TE definition with one parallel loop over (batch, head), every
  stage computed per query row.
* ``gemv`` / ``qgemv``: ``matmul.schedule_matmul_cpu`` (the matmul helper's schedules).

``SCHEDULE_ID`` is part of the kernel-cache key: bump it when a schedule changes.
"""

from __future__ import annotations

from typing import Any, Callable

import tvm

from .kernel import KernelDef, Recipe

SCHEDULE_ID = "cpu-v5"  # v5: vector GQA attention (attention_cpu.py); v4: qlinear m-tiles of 8 on AVX-512; v3: bcq_linear byte-code kernel (bcq_cpu.py)
CpuSchedule = Callable[[KernelDef, Any], Any]
CPU_SCHEDULES: dict[str, CpuSchedule] = {}


def register_cpu_schedule(*kinds: str) -> Callable[[CpuSchedule], CpuSchedule]:
    def deco(fn: CpuSchedule) -> CpuSchedule:
        for k in kinds:
            CPU_SCHEDULES[k] = fn
        return fn
    return deco


def schedule_cpu(kdef: KernelDef, target: Any) -> Any:
    try:
        fn = CPU_SCHEDULES[kdef.kind]
    except KeyError:
        raise KeyError(f"no CPU schedule for kernel kind {kdef.kind!r} ({kdef.name})") from None
    return fn(kdef, target)


def describe_cpu_schedule(kdef: KernelDef) -> str:
    """The name of the schedule ``schedule_cpu`` gives ``kdef`` (and, for the slow generic
    matmul schedule, why), for ``report()["executable"]["kernel_schedules"]`` and plan.json."""
    if kdef.kind in ("gemv", "qgemv"):
        from .matmul_cpu import choose_schedule
        return choose_schedule(kdef)
    if kdef.kind == "attention":
        return "attention-gqa-vector" if _vector_attention_args(kdef) else "attention-rows"
    return {"fused": "te-default", "injective": "te-default"}.get(kdef.kind, kdef.kind)


@register_cpu_schedule("fused", "injective")
def _plain(kdef: KernelDef, target: Any) -> Any:
    return tvm.IRModule({"main": kdef.func})


@register_cpu_schedule("gemv", "qgemv")
def _matmul(kdef: KernelDef, target: Any) -> Any:
    from .matmul import schedule_matmul_cpu
    return schedule_matmul_cpu(kdef, target)


def _vector_attention_args(kdef: KernelDef) -> tuple | None:
    """The arguments of the hand-vectorized kernel (``attention_cpu``) where it covers ``kdef``."""
    from .attention import attention_func
    from .attention_cpu import supported
    src = kdef.source
    if isinstance(src, Recipe) and src.builder is attention_func and supported(src.args[2], src.args[3]):
        return src.args
    return None


@register_cpu_schedule("attention")
def _attention(kdef: KernelDef, target: Any) -> Any:
    args = _vector_attention_args(kdef)
    if args is not None:
        from .attention_cpu import attention_cpu_func
        return tvm.IRModule({"main": attention_cpu_func(*args)})
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": kdef.func}))
    out = sch.get_sblock("out")
    b, h, i, e = sch.get_loops(out)
    for name in ("weighted", "row_sum", "probs", "row_max", "scores", "partial"):
        sch.compute_at(sch.get_sblock(name), i)
    sch.parallel(sch.fuse(b, h))
    part = sch.get_sblock("partial")
    loops = sch.get_loops(part)
    if len(loops) == 5:  # (batch*head, i, j, lane, rd); a unit rd loop is already gone
        sch.reorder(loops[-1], loops[-2])
    # the lane loop innermost: LLVM vectorises it (the init stays a guarded store: decompose_
    # reduction refuses these blocks once they sit under the fused dynamic (batch, head) loop)
    # p @ v: the kv position outside, the value dim inside (contiguous, vectorisable)
    weighted = sch.get_sblock("weighted")
    e2, rv = sch.get_loops(weighted)[-2:]
    sch.reorder(rv, e2)
    return sch.mod


