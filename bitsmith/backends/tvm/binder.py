"""Binding a call's arguments to a FunctionPlan: dtypes, ranks, symbols, every shape of the plan.

Shared by the CPU executor (``executor.PlanExecutor``, numpy arrays) and the GPU executor
(``cuda_runtime.CudaPlanExecutor``, device tensors): both take numpy arguments, bind the
plan's symbolic dims (``batch``, ``seq``, ``past``) from their shapes, check every compound
dim, and evaluate each of the plan's shapes once per call. Recipes are decided once per plan.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from ...ir import symbolic as sym
from ...ir.types import numpy_dtype
from .plan import Call, FunctionPlan, View


class ExecutionError(BitsmithError, RuntimeError):
    """Bad inputs to a compiled function (shape, dtype, token ids)."""


class PlanBinder:
    """How the arguments of one plan bind (see the module docstring)."""

    def __init__(self, plan: FunctionPlan) -> None:
        self.plan = plan
        self.param_dtypes = [np.dtype(numpy_dtype(dt)) for _, dt in plan.param_types]
        self._ranks = [len(dims) for dims, _ in plan.param_types]
        # binding recipe: (param index, axis, symbol) binds; (param index, axis, int | compound) checks
        self._plain: list[tuple[int, int, str]] = []
        self._checks: list[tuple[int, int, Any]] = []
        for k, (dims, _) in enumerate(plan.param_types):
            for ax, d in enumerate(dims):
                if isinstance(d, str) and sym.SYMBOL_NAME.match(d):
                    self._plain.append((k, ax, d))
                else:
                    self._checks.append((k, ax, d))
        dims = {d for s in plan.shapes for d in s if isinstance(d, str)}
        dims |= {d for _, _, d in self._checks if isinstance(d, str)}
        self._dims = sorted(dims)
        self._dim_index = {d: i for i, d in enumerate(self._dims)}
        self._polys = [sym.polynomial(d) for d in self._dims]
        self._shape_recipes = [tuple((True, d) if isinstance(d, int) else (False, self._dim_index[d]) for d in s)
                               for s in plan.shapes]
        escaping = set(plan.results)
        for s in reversed(plan.steps):  # a view's source escapes with it
            if isinstance(s, View) and s.dst in escaping:
                escaping.add(s.src)
        self.escaping = frozenset(escaping)

    def arrays(self, args: Sequence[Any]) -> list[np.ndarray]:
        """The arguments as numpy arrays of the plan's dtypes, count and ranks checked."""
        plan = self.plan
        if len(args) != len(plan.params):
            raise ExecutionError(f"function {plan.name!r} takes {len(plan.params)} inputs, got {len(args)}")
        out = []
        for k, (a, dt) in enumerate(zip(args, self.param_dtypes)):
            a = np.asarray(a)
            if a.dtype != dt:
                a = a.astype(dt)
            if a.ndim != self._ranks[k]:
                raise ExecutionError(f"input {k}: expected rank {self._ranks[k]}, got shape {a.shape}")
            out.append(a)
        return out

    def shapes(self, arrays: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
        """Every shape of the plan (indexed like ``plan.shapes``) for these arguments."""
        b: dict[str, int] = {}
        for k, ax, name in self._plain:
            v = arrays[k].shape[ax]
            if b.setdefault(name, v) != v:
                raise ExecutionError(f"symbol {name!r} bound to both {b[name]} and {v} "
                                     f"(input {k} has shape {arrays[k].shape})")
        try:
            vals = [sym.evaluate_poly(poly, b, d) for poly, d in zip(self._polys, self._dims)]
        except sym.SymbolicDimError as e:
            raise ExecutionError(f"{e}: the inputs do not bind it") from None
        for k, ax, d in self._checks:
            want = d if isinstance(d, int) else vals[self._dim_index[d]]
            if arrays[k].shape[ax] != want:
                raise ExecutionError(f"input {k}: dim {ax} should be {d} = {want}, got shape {arrays[k].shape}")
        return [tuple(d if static else vals[d] for static, d in r) for r in self._shape_recipes]


def check_kernels(plan: FunctionPlan, kernels: Mapping[str, Any]) -> None:
    """Every kernel the plan calls is among ``kernels``."""
    for s in plan.steps:
        if isinstance(s, Call) and s.kernel not in kernels:
            raise BitsmithError(f"kernel {s.kernel} of the plan is missing")


def check_token_ids(ids: np.ndarray | None, limit: int) -> None:
    """Token ids (an embedding's input) within [0, limit); None: not on the host, unchecked."""
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= limit):
        raise ExecutionError(f"token id out of range [0, {limit}): min {ids.min()}, max {ids.max()}")
