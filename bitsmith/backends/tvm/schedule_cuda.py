"""CUDA schedules for tvm-backend kernels: dlight rules plus hand-written linear schedules.

Every KernelDef (an unscheduled TIR function) becomes a scheduled IRModule for a CUDA
target. Dense and quantized linear kernels ("gemv", "qgemv") with a dynamic row count get
one function per row regime (``LINEAR_REGIMES``), compiled side by side; the runtime picks
one per call by the row count m:

* m <= 8 (decode), "main_gemv": a hand-written GEMV. One thread block per (row, tile of
  output features); its threads split the reduction and combine partial sums with a
  warp/block all-reduce. Quantized weights are decoded in registers right where they are
  multiplied: the decode block is inlined into the product, so no dense weight is written.
* m <= 32, "main_small", and any m, "main": tensor-core GEMMs (``schedule_mma``: CUDA C with
  inline PTX mma.sync the backend generates from the kernel's description; each weight
  tile decoded to fp16 in shared memory), on a 16-row tile with split k and a 64x64 tile.
Where the tensor-core path does not apply (float32 activations) "main" is dlight's
CUDA-core ``Matmul``, with the reason recorded per function (``bitsmith.schedule``). Linear
kernels with outlier corrections (a second reduction) have no GEMV: the tensor-core kernels
serve every m. Attention has its own two-kernel schedule (``schedule_attention``). Every
other kernel goes through dlight's default rules (``Reduction``, ``GeneralReduction``,
``RMSNorm``, ``Fallback``, ...). dlight's functions carry ``dlight.do_not_tensorize``: TVM
0.27's fp16 tensor-core path (Tensorize) segfaults for M, N, K > 64 on sm >= 70 (project
toolchain notes). CUDA kernels cannot allocate global memory, so a schedule that compiles
keeps every intermediate (a decoded weight included) in registers or shared memory.
"""

from __future__ import annotations

import inspect
import linecache
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import tvm
from tvm import tirx as tir

from ...errors import BitsmithError, OptionError
from .cuda_runtime import GEMV_MAX_ROWS, SMALL_MMA_MAX_ROWS
from .kernel import KernelDef
from .mma_gemm import LARGE_TILE, SMALL_TILE, MmaTile, TensorCoreUnsupported
from .schedule_mma import SCHEDULE_ATTR, schedule_tensor_core

DEFAULT_ARCH = "sm_90"
LINEAR_KINDS = frozenset({"gemv", "qgemv"})


class CudaScheduleError(BitsmithError):
    """A kernel could not be scheduled for CUDA (names the kernel and the rule that failed)."""


def check_arch(arch: Any) -> str:
    if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise OptionError(f"tvm-cuda: arch must look like 'sm_90' or 'sm_90a', got {arch!r}")
    return arch


def cuda_target(arch: str = DEFAULT_ARCH) -> tvm.target.Target:
    """The CUDA target for ``arch`` (e.g. "sm_90"), with an LLVM host for the launch code.

    TVM 0.27 rejects the string form "cuda -arch=sm_90"; the dict form is the supported one.
    """
    check_arch(arch)
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm")


@dataclass(frozen=True)
class GemvConfig:
    """Thread layout of the hand-written GEMV: ``threads_k`` threads share one output's
    reduction, ``rows`` output features per block, ``unroll_k`` consecutive k per thread step
    (so a thread decodes whole packed bytes), ``max_rows`` the largest row count (m) that
    takes this path when m is dynamic."""

    threads_k: int = 64
    rows: int = 4
    unroll_k: int = 8
    max_rows: int = GEMV_MAX_ROWS


DEFAULT_GEMV = GemvConfig()


# ---------------------------------------------------------------- analysis helpers

def _blocks(sch: tvm.s_tir.Schedule) -> list[Any]:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def _is_reduction(sch: tvm.s_tir.Schedule, block: Any) -> bool:
    return any(iv.iter_type == tir.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _with_attrs(func: tir.PrimFunc, name: str) -> tir.PrimFunc:
    return func.with_attr("global_symbol", name).with_attr("dlight.do_not_tensorize", True)


def _row_dim(func: tir.PrimFunc) -> Any:
    """The leading dim of the first parameter (activations x [m, in]) of a linear kernel.
    (In TVM 0.27 a PrimFunc's pointer parameters are the buffers themselves.)"""
    shape = getattr(func.params[0], "shape", None)
    if shape is None or len(shape) != 2:
        raise CudaScheduleError("linear kernel: first parameter is not a 2-D activation buffer")
    return shape[0]


# ---------------------------------------------------------------- hand-written GEMV

def schedule_gemv(func: tir.PrimFunc, cfg: GemvConfig = DEFAULT_GEMV) -> tir.PrimFunc:
    """Schedules a linear kernel as a low-batch GEMV.

    Expected blocks: spatial prologue blocks (weight decode, casts), one reduction
    y[i, j] += f(x[i, k], w[j, k]), and spatial epilogue blocks (bias, cast). Prologues are
    inlined into the product, so the decoded weight lives only in registers; the epilogue
    runs per output after the all-reduce. Raises CudaScheduleError on other shapes (e.g.
    the outlier kernels' second reduction: a side reduction can be placed neither before
    nor after the epilogue's move under the thread loop), which then go to dlight.
    """
    sch = tvm.s_tir.Schedule(func)
    blocks = _blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    reductions = [n for n, b in zip(names, blocks) if _is_reduction(sch, b)]
    if not reductions:
        raise CudaScheduleError("GEMV schedule needs a reduction block")
    if len(reductions) > 1:
        raise CudaScheduleError(f"GEMV schedule handles one reduction block, found {len(reductions)}")
    red_name = reductions[0]
    position = names.index(red_name)
    for name in reversed(names[:position]):  # decode / cast prologue: computed where it is used
        sch.compute_inline(sch.get_sblock(name))
    spatial_after = names[position + 1:]
    red = sch.get_sblock(red_name)
    iters = sch.get(red).iter_vars
    loops = sch.get_loops(red)
    spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tir.IterVar.DataPar]
    reduce = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tir.IterVar.CommReduce]
    if len(spatial) != 2 or not reduce:
        raise CudaScheduleError(f"GEMV schedule needs spatial loops (m, out) and a reduction, "
                                f"got {len(spatial)} spatial, {len(reduce)} reduction loops")
    i, j = spatial
    k = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
    jo, jt = sch.split(j, [None, cfg.rows])
    ko, kx, ku = sch.split(k, [None, cfg.threads_k, cfg.unroll_k])
    sch.reorder(i, jo, jt, ko, kx, ku)
    sch.bind(i, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(jt, "threadIdx.y")
    sch.bind(kx, "threadIdx.x")
    sch.unroll(ku)
    for name in spatial_after:  # cast / bias: one result per output, after the all-reduce
        sch.reverse_compute_at(sch.get_sblock(name), jt, preserve_unit_loops=True)
    if spatial_after:
        sch.set_scope(red, 0, "local")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ---------------------------------------------------------------- dlight

# dlight's GPU rules by class name, tried in order (imported lazily: dlight needs TVM's
# compiler library, which a runtime-only install that loads artifacts does not have)
DLIGHT_RULES = ("Matmul", "GEMV", "LowBatchGEMV", "Reduction", "GeneralReduction", "RMSNorm", "Fallback")
MATMUL_RULES = ("Matmul", "Fallback")


def _import_tensor_intrinsics() -> None:
    """Imports ``tvm.s_tir.tensor_intrin`` (dlight's Matmul rule does, on first use) with a
    cheap ``inspect.stack``.

    The module parses ~500 TVMScript functions; the parser calls ``inspect.stack()`` for
    each (and ``inspect.getouterframes``), which resolve every frame's module by scanning
    ``sys.modules``. With torch and
    transformers loaded that import took 140-300 s on a 2-core machine; the parser only
    needs each frame and its source line, which ``linecache`` gives directly.
    """
    if "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        return
    originals = (inspect.stack, inspect.getouterframes)

    def fast_outer(frame: Any, context: int = 1) -> list[inspect.FrameInfo]:
        frames = []
        while frame is not None:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
            frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name,
                                            [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return frames

    inspect.stack = lambda context=1: fast_outer(sys._getframe(1), context)
    inspect.getouterframes = fast_outer
    try:
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401
    except Exception:  # noqa: BLE001 - dlight imports it again and reports its own error
        pass
    finally:
        inspect.stack, inspect.getouterframes = originals


def schedule_dlight(func: tir.PrimFunc, target: tvm.target.Target,
                    rules: tuple[str, ...] = DLIGHT_RULES) -> tir.PrimFunc:
    """dlight's first applicable rule; raises CudaScheduleError if none scheduled it."""
    _import_tensor_intrinsics()
    from tvm.s_tir import dlight as dl
    mod = tvm.IRModule({"main": func.with_attr("dlight.do_not_tensorize", True)})
    try:
        with target:
            out = dl.ApplyDefaultSchedule(*[getattr(dl.gpu, r)() for r in rules])(mod)
    except Exception as e:  # noqa: BLE001 - dlight raises assorted TVM errors
        raise CudaScheduleError(f"dlight failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}") from e
    scheduled = out["main"]
    if not scheduled.attrs or not scheduled.attrs.get("tirx.is_scheduled", False):
        raise CudaScheduleError("no dlight rule applies")
    return scheduled


# ---------------------------------------------------------------- attention

def schedule_attention(func: tir.PrimFunc, threads: int = 64) -> tir.PrimFunc:
    """Two kernels for ``attention.attention_kernel`` whose ``scores`` is a parameter
    (``cuda_scratch``: CUDA kernels cannot allocate global memory, and kv_len is dynamic).

    Both use one thread block per query row (blockIdx = (i, head, batch)) and split the
    key axis j over threads. Kernel 1 writes the row of scores; kernel 2 computes max, sum
    and the weighted sum over j as block all-reduces (results in registers, scope
    "local", received by every thread), recomputing the probabilities where they are read.
    """
    sch = tvm.s_tir.Schedule(func)

    def bind_rows(loops: Sequence[Any]) -> Any:
        b, h, i = loops[:3]
        # not fused: b, s are int64 and heads int32, and a fused binding would need a cast
        # that makes the reduction blocks' bindings non-affine
        sch.bind(i, "blockIdx.x")
        sch.bind(h, "blockIdx.y")
        sch.bind(b, "blockIdx.z")
        return i

    def thread_split(loop: Any) -> None:
        _, tx = sch.split(loop, [None, threads])
        sch.bind(tx, "threadIdx.x")

    sch.compute_inline(sch.get_sblock("probs"))
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    if len(loops) != 4:
        raise CudaScheduleError(f"attention schedule expects out[b, h, i, e], got {len(loops)} loops")
    i = bind_rows(loops)
    for name in ("weighted", "row_sum", "row_max"):
        sch.compute_at(sch.get_sblock(name), i, preserve_unit_loops=True)
    for name in ("row_max", "row_sum", "weighted"):
        blk = sch.get_sblock(name)
        thread_split(sch.get_loops(blk)[-1])
        sch.set_scope(blk, 0, "local")
    scores = sch.get_sblock("scores")
    sl = sch.get_loops(scores)
    bind_rows(sl)
    _, tx = sch.split(sl[3], [None, threads])
    sch.bind(tx, "threadIdx.x")
    known = {"scores", "row_max", "row_sum", "weighted", "out"}
    for blk in sch.get_producers(scores):  # e.g. lane-wise partial dot products: per thread
        if sch.get(blk).name_hint not in known:
            sch.compute_at(blk, tx, preserve_unit_loops=True)
            sch.set_scope(blk, 0, "local")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


# ---------------------------------------------------------------- linear: one function per row regime

@dataclass(frozen=True)
class RowRegime:
    """One compiled function of a linear kernel: ``function`` serves row counts up to
    ``max_rows`` (None: any), ``schedule(func, target, gemv_cfg, stem)`` makes it."""

    function: str
    max_rows: int | None
    schedule: Callable[[tir.PrimFunc, tvm.target.Target, GemvConfig, str], tir.PrimFunc]


def _gemv_regime(func: tir.PrimFunc, target: tvm.target.Target, cfg: GemvConfig, stem: str) -> tir.PrimFunc:
    return schedule_gemv(func, cfg).with_attr(SCHEDULE_ATTR, "hand-written GEMV (CUDA cores, decode in registers)")


def _tensor_core_regime(tile: MmaTile) -> Callable[..., tir.PrimFunc]:
    def build(func: tir.PrimFunc, target: tvm.target.Target, cfg: GemvConfig, stem: str) -> tir.PrimFunc:
        try:
            return schedule_tensor_core(func, tile, stem)
        except TensorCoreUnsupported as e:
            raise CudaScheduleError(f"tensor cores: {e}") from e
    return build


# tried in order for each row count; the runtime (``cuda_runtime.LinearDispatch``) calls the
# first function present whose max_rows covers m, "main" otherwise
LINEAR_REGIMES = (
    RowRegime("main_gemv", DEFAULT_GEMV.max_rows, _gemv_regime),
    RowRegime("main_small", SMALL_MMA_MAX_ROWS, _tensor_core_regime(SMALL_TILE)),
    RowRegime("main", None, _tensor_core_regime(LARGE_TILE)),
)


def _dlight_matmul(func: tir.PrimFunc, target: tvm.target.Target, why: str) -> tir.PrimFunc:
    """The CUDA-core fallback for any row count (reason recorded with the kernel)."""
    try:
        out = schedule_dlight(func, target, MATMUL_RULES)
        rule = "dlight Matmul"
    except CudaScheduleError:
        out = schedule_dlight(func, target)
        rule = "dlight default rules"
    return out.with_attr(SCHEDULE_ATTR, f"{rule} (CUDA cores): {why}")


def schedule_linear(func: tir.PrimFunc, target: tvm.target.Target, cfg: GemvConfig = DEFAULT_GEMV,
                    stem: str = "linear") -> dict[str, tir.PrimFunc]:
    """One function per row regime (``LINEAR_REGIMES``) that applies; a static row count gets the
    first regime that covers it, as "main". A regime that does not apply (e.g. the GEMV for a
    kernel with outlier corrections, tensor cores for float32 activations) is left out, and a
    missing "main" becomes dlight's CUDA-core Matmul with the reason in ``bitsmith.schedule``.

    TVM cannot put a host-side branch between two kernels with shared memory (its sync
    planner rejects syncs under a condition), so the row-count dispatch lives in the runtime.
    """
    rows = _row_dim(func)
    static = int(rows) if isinstance(rows, tir.IntImm) else None
    out: dict[str, tir.PrimFunc] = {}
    refused: list[str] = []
    for regime in LINEAR_REGIMES:
        covers = regime.max_rows is None or (static is not None and static <= regime.max_rows)
        if static is not None and not covers:
            continue
        try:
            built = regime.schedule(func, target, cfg, f"{stem}_{regime.function}")
        except CudaScheduleError as e:
            refused.append(f"{regime.function}: {e}")
            continue
        out["main" if static is not None else regime.function] = built
        if static is not None:
            break
    if "main" not in out:
        out["main"] = _dlight_matmul(func, target, "; ".join(refused) or "no regime applies")
    return out


# ---------------------------------------------------------------- entry point

def _schedule_by_kind(kernel: KernelDef, func: tir.PrimFunc, target: tvm.target.Target,
                      gemv: GemvConfig) -> dict[str, tir.PrimFunc]:
    if kernel.kind in LINEAR_KINDS:
        return schedule_linear(func, target, gemv, kernel.name)
    if kernel.kind == "attention":
        return {"main": schedule_attention(func)}
    return {"main": schedule_dlight(func, target)}


def schedule_kernel(kernel: KernelDef, target: tvm.target.Target,
                    gemv: GemvConfig = DEFAULT_GEMV) -> tvm.IRModule:
    """The scheduled IRModule of one kernel: "main" (every shape) and, for linear kernels
    whose row count is dynamic, the functions of the other row regimes (``LINEAR_REGIMES``)."""
    if isinstance(kernel.func, tvm.IRModule):  # scheduled by hand (``attention_cuda``)
        return tvm.IRModule({gv.name_hint: _with_attrs(f, gv.name_hint) for gv, f in kernel.func.functions.items()})
    func = kernel.func.with_attr("dlight.do_not_tensorize", True)
    try:
        funcs = _schedule_by_kind(kernel, func, target, gemv)
    except CudaScheduleError as e:
        raise CudaScheduleError(f"tvm-cuda: cannot schedule kernel {kernel.name!r} (kind {kernel.kind}): {e}") from e
    except (RuntimeError, tvm.error.InternalError) as e:  # a schedule primitive refused: name the kernel
        raise CudaScheduleError(f"tvm-cuda: cannot schedule kernel {kernel.name!r} (kind {kernel.kind}): "
                                f"{str(e).strip().splitlines()[-1][:300]}") from e
    return tvm.IRModule({name: _with_attrs(f, name) for name, f in funcs.items()})
