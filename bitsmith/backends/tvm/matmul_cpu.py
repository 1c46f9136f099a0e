"""CPU (llvm) scheduling of the matmul kernels: a hand-vectorized kernel of the same signature
when one applies (``matmul_cpu_kernels``), else a generic schedule of the TE definition."""

from __future__ import annotations

from typing import Any

from ...errors import BitsmithError
from .kernel import KernelDef
from .matmul_defs import matmul_attrs
from .qlinear_layout import LANES, layout_from_attrs as _layout_from_attrs


def host_llvm_target(tvm):
    """llvm target for this machine's CPU as LLVM names it (e.g. znver3: AVX2 + FMA + F16C)."""
    from tvm.target import codegen
    return tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})


def generic_schedule(kdef: KernelDef):
    """Correct for every definition: decode inlined into the reduction, tiles of 8 output rows
    in parallel. Slow (scalar); used where the vector kernel does not apply."""
    import tvm
    sch = tvm.s_tir.Schedule(tvm.IRModule({"main": kdef.func}))
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if "decode" in names:
        sch.compute_inline(sch.get_sblock("decode"))
    i, n, k = sch.get_loops(sch.get_sblock("matmul"))
    no, ni = sch.split(n, [None, 8])
    sch.reorder(no, i, ni, k)
    sch.parallel(no)
    sch.parallel(sch.get_loops(sch.get_sblock("epilogue"))[0])
    if "outliers" in names:
        sch.parallel(sch.get_loops(sch.get_sblock("outliers"))[0])
    return sch.mod


def _has(target, feature: str) -> bool:
    from tvm.target import codegen
    try:
        return bool(codegen.llvm_cpu_has_features(feature, target))
    except Exception:  # non-x86 triples may not know the feature name
        return False


def _param_shapes(func, skip_first: int = 1) -> list[tuple[tuple[int, ...], str]]:
    out = []
    for p in list(func.params)[skip_first:-1]:
        buf = p.buffer if hasattr(p, "buffer") else p
        out.append((tuple(int(s) for s in buf.shape), str(buf.dtype)))
    return out


VECTOR_DENSE = "vector-dense"
VECTOR_QLINEAR = "vector-qlinear"
VECTOR_QLINEAR_A8 = "vector-qlinear-a8"
VECTOR_QLINEAR_GROUPED = "vector-qlinear-grouped"  # GGUF Q4_0 / Q4_1 / Q4_K / Q8_0 blocks, float (qlinear_grouped)
VECTOR_BCQ = "vector-bcq"
GENERIC = "generic"


def _matmul_attrs(kdef: KernelDef) -> dict[str, Any] | None:
    return matmul_attrs(kdef.func)


def choose_schedule(kdef: KernelDef) -> str:
    """The schedule ``schedule`` gives this kernel: VECTOR_DENSE, VECTOR_QLINEAR(_GROUPED, _A8), or GENERIC with
    the reason after a colon (reported per kernel, so the slow path is never taken silently)."""
    a = _matmul_attrs(kdef)
    if a is None:
        return f"{GENERIC}: no matmul attributes on the definition"
    if str(a["op"]) == "linear":
        return VECTOR_DENSE
    if str(a["op"]) == "bcq_linear":  # backends/tvm/bcq.py, bcq_cpu.py
        from .bcq_cpu import applies
        return VECTOR_BCQ if applies(a) else (
            f"{GENERIC}: bcq_linear group_size {a['group_size']} is not a multiple of {LANES} (scalar decode)")
    if int(a.get("activation_bits", 32)) == 8:  # set only where qlinear_a8 or qlinear_a8_wide covers the layout
        return VECTOR_QLINEAR_A8
    from .qlinear_grouped import applies as grouped_applies
    if grouped_applies(_layout_from_attrs(a)) is None:
        return VECTOR_QLINEAR_GROUPED
    group_size = int(a["group_size"])
    if group_size % LANES:
        return (f"{GENERIC}: group_size {group_size} is not a multiple of {LANES}, so the vector kernel's "
                f"{LANES}-weight chunks would straddle groups (scalar code, several times slower)")
    return VECTOR_QLINEAR


def schedule(kdef: KernelDef, target):
    import tvm
    from . import matmul_cpu_kernels as kern
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if target.kind.name != "llvm":
        raise BitsmithError(f"schedule_matmul_cpu: target {target.kind.name!r} is not llvm")
    chosen = choose_schedule(kdef)
    if chosen.startswith(GENERIC):
        return generic_schedule(kdef)
    a = _matmul_attrs(kdef)
    assert a is not None
    if chosen == VECTOR_BCQ:
        from .bcq_cpu import bcq_kernel
        func = bcq_kernel(a, _param_shapes(kdef.func))
    elif chosen == VECTOR_DENSE:
        func = kern.dense_kernel(int(a["in_features"]), int(a["out_features"]), bool(a["has_bias"]),
                                 str(a["act_dtype"]), str(a["weight_dtype"]))
    elif chosen == VECTOR_QLINEAR_A8:
        from .qlinear_a8 import applies as gguf_a8_applies, qlinear_a8_kernel
        from .qlinear_a8_wide import qlinear_a8_wide_kernel
        if not _has(target, "avx2"):
            raise BitsmithError(f"activation_bits=8 needs integer dot instructions (AVX2 or AVX-512 VNNI); "
                                f"mcpu {target.attrs.get('mcpu', '?')!s} has neither (kernel {kdef.name})")
        vnni = (_has(target, "avx512vnni") and _has(target, "avx512vl")) or _has(target, "avxvnni")
        lay = _layout_from_attrs(a)
        if gguf_a8_applies(lay) is None:
            func = qlinear_a8_kernel(lay, _param_shapes(kdef.func), str(a["act_dtype"]), vnni=vnni)
        else:
            zmm = _has(target, "avx512vnni") and _has(target, "avx512bw")
            func = qlinear_a8_wide_kernel(lay, _param_shapes(kdef.func), str(a["act_dtype"]), vnni=vnni, zmm=zmm)
    elif chosen == VECTOR_QLINEAR_GROUPED:
        from .qlinear_grouped import qlinear_grouped_kernel
        func = qlinear_grouped_kernel(_layout_from_attrs(a), _param_shapes(kdef.func), str(a["act_dtype"]))
    else:
        tiling = kern.QLINEAR_TILING_AVX512 if _has(target, "avx512f") else kern.Tiling()
        func = kern.qlinear_kernel(_layout_from_attrs(a), _param_shapes(kdef.func), str(a["act_dtype"]),
                                   use_pshufb=_has(target, "ssse3"), t=tiling)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
