"""Matmul kernels of the tvm backend: dense ``linear`` and quantized ``qlinear``.

API used by the tvm-llvm executor (core) and the CUDA scheduler:

* :func:`linear_kernel` / :func:`qlinear_kernel` give unscheduled ``KernelDef``s (kinds "gemv"
  and "qgemv"; see ``matmul_defs`` for their blocks);
* :func:`qlinear_operands` turns a qlinear node's constants into the kernel's operands
  (``qlinear_layout``: codes re-sliced, never dense float weights);
* :func:`schedule_matmul_cpu` schedules either for an llvm target;
* :func:`compile_linear` / :func:`compile_qlinear` are standalone conveniences (benchmarks, tests).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from .kernel import KernelDef, Recipe
from . import qlinear_a8, qlinear_a8_wide
from .matmul_defs import ATTR, linear_func, matmul_attrs, qlinear_func
from .qlinear_layout import layout_for, qlinear_operands

__all__ = ["linear_kernel", "qlinear_kernel", "qlinear_operands", "schedule_matmul_cpu",
           "compile_linear", "compile_qlinear", "host_target"]

_FLOATS = ("float32", "float16")


def _check_dtype(what: str, dtype: str) -> None:
    if dtype not in _FLOATS:
        raise BitsmithError(f"tvm matmul: {what} dtype {dtype!r} is not supported (use {' or '.join(_FLOATS)})")


def linear_kernel(in_features: int, out_features: int, has_bias: bool, act_dtype: str,
                  weight_dtype: str) -> KernelDef:
    """y[m, out] = x[m, in] @ w[out, in].T (+ bias[out]), float32 accumulation.
    Params: x, w, [bias], y; ``m`` is a tir.Var."""
    _check_dtype("activation", act_dtype)
    _check_dtype("weight", weight_dtype)
    if in_features <= 0 or out_features <= 0:
        raise BitsmithError(f"tvm linear: bad shape in={in_features} out={out_features}")
    recipe = Recipe(linear_func, (int(in_features), int(out_features), bool(has_bias), str(act_dtype), str(weight_dtype)))
    name = f"linear_{in_features}x{out_features}_{act_dtype}_{weight_dtype}{'_bias' if has_bias else ''}"
    return KernelDef(name, recipe, "gemv")


def _outlier_width(attrs: Mapping[str, Any], operands: Sequence[np.ndarray]) -> int:
    if not attrs["outliers"]:
        return 0
    lay = layout_for(attrs, 1)
    ptr = np.asarray(operands[lay.roles().index("outlier_rowptr")])
    if ptr.shape != (int(attrs["out_features"]) + 1,):
        raise BitsmithError(f"qlinear outlier_rowptr has shape {ptr.shape}, expected ({attrs['out_features']}+1,)")
    return max(1, int(np.diff(ptr).max()))


def qlinear_kernel(attrs: Mapping[str, Any], operands: Sequence[np.ndarray], act_dtype: str,
                   activation_bits: int = 32) -> KernelDef:
    """Params: x [m, in], *operands (from :func:`qlinear_operands`), y [m, out].
    ``activation_bits=8``: an int8-activation kernel (``qlinear_a8``: GGUF blocks;
    ``qlinear_a8_wide``: zero-point or grid-table codes in wide groups) where one covers the layout (the
    definition then carries ``activation_bits`` for the CPU schedule; other layouts stay float)."""
    _check_dtype("activation", act_dtype)
    lay = layout_for(attrs, _outlier_width(attrs, operands))
    roles = lay.roles()
    if len(operands) != len(roles):
        raise BitsmithError(f"qlinear kernel expects operands {roles}, got {len(operands)} arrays")
    shapes = [(tuple(int(s) for s in a.shape), str(a.dtype)) for a in operands]
    func = qlinear_func(lay, shapes, act_dtype)
    a8 = activation_bits == 8 and (qlinear_a8.applies(lay) is None or qlinear_a8_wide.applies(lay) is None)
    if a8:
        func = func.with_attr(ATTR, {**matmul_attrs(func), "activation_bits": 8})
    sp = f"_{lay.nm[0]}of{lay.nm[1]}" if lay.nm else ""
    name = (f"qlinear_{lay.scheme.replace('-', '_')}_g{lay.group_size}_{lay.in_features}x{lay.out_features}"
            f"{sp}{'_ol' if lay.outlier_width else ''}{'_bias' if lay.has_bias else ''}_{act_dtype}{'_a8' if a8 else ''}")
    return KernelDef(name, func, "qgemv")


def host_target():
    """The llvm target of this machine (its CPU name, so LLVM uses all of its vector units)."""
    import tvm
    from .matmul_cpu import host_llvm_target
    return host_llvm_target(tvm)


def schedule_matmul_cpu(kdef: KernelDef, target) -> "Any":
    """A scheduled IRModule (function "main", same params as ``kdef.func``) for an llvm target.

    One module serves every m: it walks m in tiles of 4 rows and then single rows at run time,
    so no m hint is needed. Hand-vectorized kernels (``matmul_cpu_kernels``; grid lookup by
    ``pshufb`` where the target has SSSE3, a table gather elsewhere); a qlinear whose group size
    is not a multiple of 16: a generic (correct, slower) schedule of the definition, named with
    its reason in ``report()["executable"]["kernel_schedules"]`` (``matmul_cpu.choose_schedule``).
    A non-llvm target raises BitsmithError."""
    from .matmul_cpu import schedule
    if kdef.kind not in ("gemv", "qgemv"):
        raise BitsmithError(f"schedule_matmul_cpu: kernel {kdef.name} has kind {kdef.kind!r}, not gemv/qgemv")
    return schedule(kdef, target)


def _compile(kdef: KernelDef, consts: list[np.ndarray], out_features: int, act_dtype: str,
             target) -> Callable[[np.ndarray], np.ndarray]:
    import tvm
    target = host_target() if target is None else target
    lib = tvm.compile(schedule_matmul_cpu(kdef, target), target=target)
    fn = lib["main"]
    dev = tvm.cpu()
    held = [tvm.runtime.tensor(np.ascontiguousarray(c), dev) for c in consts]

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=act_dtype)
        if x.ndim != 2:
            raise BitsmithError(f"expected x [m, in], got shape {x.shape}")
        y = tvm.runtime.tensor(np.empty((x.shape[0], out_features), dtype=act_dtype), dev)
        fn(tvm.runtime.tensor(x, dev), *held, y)
        return y.numpy()

    run.kernel = kdef  # type: ignore[attr-defined]
    run.function = fn  # type: ignore[attr-defined]
    run.constants = held  # type: ignore[attr-defined]
    return run


def compile_qlinear(attrs: Mapping[str, Any], arrays: Sequence[np.ndarray], *, act_dtype: str = "float32",
                    target=None) -> Callable[[np.ndarray], np.ndarray]:
    """x [m, in] -> y [m, out] for one qlinear (``arrays``: its constant operands in IR order)."""
    ops = qlinear_operands(attrs, arrays, act_dtype)
    kdef = qlinear_kernel(attrs, ops, act_dtype)
    return _compile(kdef, ops, int(attrs["out_features"]), act_dtype, target)


def compile_linear(weight: np.ndarray, bias: np.ndarray | None = None, *, target=None) -> Callable[[np.ndarray], np.ndarray]:
    """x [m, in] -> y [m, out] for a dense float32/float16 weight [out, in] (activations in its dtype)."""
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise BitsmithError(f"compile_linear: weight must be [out, in], got {weight.shape}")
    dtype = str(weight.dtype)
    kdef = linear_kernel(weight.shape[1], weight.shape[0], bias is not None, dtype, dtype)
    consts = [weight] + ([np.asarray(bias, dtype=dtype)] if bias is not None else [])
    return _compile(kdef, consts, weight.shape[0], dtype, target)
