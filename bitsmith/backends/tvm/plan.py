"""The executor's plan: a flat, JSON-serialisable list of steps over numbered value slots.

``plan.json`` in an artifact holds one FunctionPlan per IR function. It contains only
ints and strings: slot numbers, shape templates (IR dims), kernel keys, tensor names.
Loading validates the types and never evaluates anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...errors import ArtifactError
from ..files import target_files
from ..native_loader import NativeSpec
from ..json_fields import Field, parse
from ...ir import symbolic as sym
from ...ir.symbolic import Dim
from ...ir.types import DTYPES

PLAN_FORMAT = 1
EXTERN_PREFIX = "extern:"   # a Call whose kernel the executable supplies itself (not a TVM library)


class PlanError(ArtifactError):
    """A malformed plan (from an artifact's plan.json): ArtifactError(file, problem)."""


@dataclass
class Call:
    kernel: str                       # kernel key (cache digest)
    inputs: list[int]
    outputs: list[tuple[int, int, str]]  # (slot, shape id, numpy dtype name)
    check_ids: tuple[int, int] | None = None  # (slot, exclusive bound): embedding ids range check
    name: str = ""            # the kernel's readable name (reports, profiles)


@dataclass
class View:
    src: int
    dst: int
    shape: int


@dataclass
class Const:
    slot: int
    tensor: str = ""        # a module tensor by name
    scalar: tuple[Any, str] | None = None  # (value, dtype)
    qlinear: str = ""       # derived: operand ``index`` of the qlinear node producing value ``qlinear``
    index: int = 0


@dataclass
class FunctionPlan:
    name: str
    num_slots: int
    params: list[int]
    param_types: list[tuple[list[Dim], str]]
    results: list[int]
    shapes: list[list[Dim]]
    consts: list[Const] = field(default_factory=list)
    steps: list[Call | View] = field(default_factory=list)
    act_dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        steps = []
        for s in self.steps:
            if isinstance(s, Call):
                steps.append({"call": s.kernel, "in": s.inputs, "out": [list(o) for o in s.outputs],
                              **({"check_ids": list(s.check_ids)} if s.check_ids else {}),
                              **({"name": s.name} if s.name else {})})
            else:
                steps.append({"view": [s.src, s.dst, s.shape]})
        consts = []
        for c in self.consts:
            d: dict[str, Any] = {"slot": c.slot}
            if c.tensor:
                d["tensor"] = c.tensor
            elif c.scalar is not None:
                d["scalar"] = list(c.scalar)
            else:
                d["qlinear"], d["index"] = c.qlinear, c.index
            consts.append(d)
        return {"name": self.name, "num_slots": self.num_slots, "params": self.params,
                "param_types": [[list(s), dt] for s, dt in self.param_types], "results": self.results,
                "shapes": [list(s) for s in self.shapes], "consts": consts, "steps": steps,
                "act_dtype": self.act_dtype}

    @staticmethod
    def from_json(d: Any, file: str = "plan.json", path: str = "") -> "FunctionPlan":
        """Decodes ``to_json``'s output; ArtifactError (PlanError) naming ``file`` and the field."""
        f = d if isinstance(d, Field) else Field(d, file, path)
        steps: list[Call | View] = []
        for s in f["steps"].list():
            if s.has("call"):
                check = s["check_ids"].ints(length=2) if s.has("check_ids") else None
                outs = []
                for o in s["out"].list():
                    slot, shape, dtype = o.list(3)
                    outs.append((slot.int(), shape.int(), dtype.str(choices=_NP_DTYPE)))
                steps.append(Call(checked_kernel_key(s["call"]), s["in"].ints(), outs,
                                  tuple(check) if check else None,
                                  s["name"].str() if s.has("name") else ""))
            else:
                a, b, c = s["view"].ints(length=3)
                steps.append(View(a, b, c))
        consts = []
        for c in f["consts"].list():
            slot = c["slot"].int()
            if c.has("tensor"):
                consts.append(Const(slot, tensor=c["tensor"].str()))
            elif c.has("scalar"):
                v, dt = c["scalar"].list(2)
                consts.append(Const(slot, scalar=(_scalar(v, dt.str(choices=_NP_DTYPE)), dt.value)))
            else:
                consts.append(Const(slot, qlinear=c["qlinear"].str(), index=c["index"].int(0, MAX_OPERANDS - 1)))
        param_types = []
        for p in f["param_types"].list():
            shape, dt = p.list(2)
            param_types.append(([_dim(x) for x in shape.list()], dt.str(choices=_NP_DTYPE)))
        plan = FunctionPlan(f["name"].str(), f["num_slots"].int(0, MAX_SLOTS), f["params"].ints(), param_types,
                            f["results"].ints(), [[_dim(x) for x in s.list()] for s in f["shapes"].list()],
                            consts, steps, f["act_dtype"].str(choices=_NP_DTYPE) if f.has("act_dtype") else "float32")
        try:
            plan.check()
        except PlanError as e:
            f.fail(e.problem)
        return plan

    def check(self) -> None:
        n = self.num_slots
        slots = list(self.params) + list(self.results) + [c.slot for c in self.consts]
        for s in self.steps:
            if isinstance(s, Call):
                slots += s.inputs + [o[0] for o in s.outputs]
                if any(not 0 <= o[1] < len(self.shapes) for o in s.outputs):
                    raise PlanError("plan.json", "shape id out of range")
                if s.check_ids is not None and not 0 <= s.check_ids[0] < n:
                    raise PlanError("plan.json", "check_ids slot out of range")
            else:
                slots += [s.src, s.dst]
                if not 0 <= s.shape < len(self.shapes):
                    raise PlanError("plan.json", "shape id out of range")
        if any(not 0 <= x < n for x in slots):
            raise PlanError("plan.json", f"slot out of range [0, {n})")
        if len(self.params) != len(self.param_types):
            raise PlanError("plan.json", f"{len(self.params)} params but {len(self.param_types)} param_types")
        bound = {d for dims, _ in self.param_types for d in dims if isinstance(d, str) and sym.SYMBOL_NAME.match(d)}
        for where, dims in [("param_types", d) for d, _ in self.param_types] + [("shapes", d) for d in self.shapes]:
            for d in dims:
                if isinstance(d, str) and not sym.symbols(d) <= bound:
                    raise PlanError("plan.json", f"{where}: dim {d!r} uses symbols {sorted(sym.symbols(d) - bound)} "
                                                 f"that no parameter dim binds"[:200])
        self.slot_types()

    def slot_types(self) -> dict[int, tuple[list[Dim] | None, str | None]]:
        """(dims, dtype) of each slot as the steps define it, in order; None where the plan does not
        say (a constant's shape comes from the module). Raises PlanError for a slot read before any
        parameter, constant or step defines it, and for a view whose element count differs from its
        source's (the reshape would fail on the first call)."""
        types: dict[int, tuple[list[Dim] | None, str | None]] = {c.slot: (None, c.scalar[1] if c.scalar else None)
                                                                  for c in self.consts}
        for slot, (dims, dt) in zip(self.params, self.param_types):
            types[slot] = (dims, dt)
        for k, s in enumerate(self.steps):
            if isinstance(s, Call):
                reads = list(s.inputs) + ([s.check_ids[0]] if s.check_ids is not None else [])
                for i in reads:
                    if i not in types:
                        raise PlanError("plan.json", f"steps[{k}] reads slot {i} before anything defines it")
                for slot, shp, dt in s.outputs:
                    types[slot] = (self.shapes[shp], dt)
            else:
                if s.src not in types:
                    raise PlanError("plan.json", f"steps[{k}] views slot {s.src} before anything defines it")
                src_dims, dt = types[s.src]
                dst_dims = self.shapes[s.shape]
                if src_dims is not None and not sym.dims_equal(sym.product(tuple(src_dims)),
                                                               sym.product(tuple(dst_dims))):
                    raise PlanError("plan.json", f"steps[{k}].view: shape {dst_dims} does not have the "
                                                 f"{src_dims} elements of slot {s.src}"[:200])
                types[s.dst] = (dst_dims, dt)
        for r in self.results:
            if r not in types:
                raise PlanError("plan.json", f"result slot {r} is never defined")
        return types

    def check_against(self, module: Any, file: str) -> None:
        """The plan's signature against the IR function it was lowered from: parameter and result
        count, types (canonical dims, dtype) where the plan says them. ArtifactError naming ``file``."""
        where = f"functions[{self.name!r}]"[:80]
        fn = next((f for f in module.functions if f.name == self.name), None)
        if fn is None:
            raise PlanError(file, f"{where}: the module has no function {self.name!r}")
        if len(fn.params) != len(self.params) or len(fn.results) != len(self.results):
            raise PlanError(file, f"{where}: {len(self.params)} params and {len(self.results)} results, but the "
                                  f"IR function has {len(fn.params)} and {len(fn.results)}")
        for k, (p, (dims, dt)) in enumerate(zip(fn.params, self.param_types)):
            if not _same_type(dims, dt, p.type):
                raise PlanError(file, f"{where}.param_types[{k}]: {dims} {dt} is not the IR's {p.type}"[:200])
        types = self.slot_types()
        for k, (slot, t) in enumerate(zip(self.results, fn.result_types())):
            dims, dt = types[slot]
            if dims is not None and not _same_type(dims, dt or t.dtype, t):
                raise PlanError(file, f"{where}.results[{k}]: slot {slot} is {dims} {dt}, not the IR's {t}"[:200])


def _same_type(dims: list[Dim], dtype: str, t: Any) -> bool:
    return (dtype == t.dtype and len(dims) == len(t.shape)
            and all(sym.dims_equal(a, b) for a, b in zip(dims, t.shape)))


def as_int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise PlanError("plan.json", f"expected an int, got {x!r}"[:200])
    return x


def as_ints(xs: Any) -> list[int]:
    if not isinstance(xs, list):
        raise PlanError("plan.json", f"expected a list, got {xs!r}"[:200])
    return [as_int(x) for x in xs]


def as_str(x: Any) -> str:
    if not isinstance(x, str):
        raise PlanError("plan.json", f"expected a string, got {x!r}"[:200])
    return x


def _dim(x: Field) -> Dim:
    """An IR dim: an int in [0, MAX_DIM] or a polynomial over symbols that ``ir.symbolic`` parses
    (the executor turns it into a polynomial when it is built: a malformed one must fail here)."""
    v = x.value
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        x.fail(f"expected a dim (an integer or a symbol name), got {v!r}"[:200])
    if isinstance(v, int):
        return x.int(0, MAX_DIM)
    if len(v) > 200:
        x.fail(f"dim expression of {len(v)} characters (at most 200)")
    try:
        poly = sym._to_poly(v)
    except sym.SymbolicDimError as e:
        x.fail(str(e)[:200])
    if any(abs(c) > MAX_DIM for c in poly.values()):
        x.fail(f"dim {v!r} has a coefficient beyond {MAX_DIM}"[:200])
    return v


def _scalar(v: Field, dtype: str) -> int | float | bool:
    """A scalar constant's value, which must be representable in its dtype (numpy would raise
    OverflowError when the executor is built)."""
    import numpy as np
    x = v.number()
    try:
        np.array(x, dtype=np.dtype(dtype))
    except (OverflowError, ValueError, TypeError) as e:
        v.fail(f"{x!r} does not fit dtype {dtype}: {e}"[:200])
    return x


_KERNEL_KEY = re.compile(r"[0-9a-f]{64}|" + re.escape(EXTERN_PREFIX) + r"[A-Za-z0-9_.:/%-]{1,200}")
# the numpy names of the IR's dtypes (ir/types.py), the only ones the executors convert
_NP_DTYPE = tuple(npdt.name for _, npdt in DTYPES.values())
MAX_SLOTS = 1 << 24
MAX_DIM = 1 << 40       # no tensor dim (or dim coefficient) of a real model comes near it
MAX_OPERANDS = 16       # operands a qlinear lowering derives (matmul.qlinear_operands)


def checked_kernel_key(v: Any) -> str:
    """A cache digest (it names a file under kernels/) or an extern name; nothing path-like."""
    if isinstance(v, Field):
        if not isinstance(v.value, str) or not _KERNEL_KEY.fullmatch(v.value):
            v.fail(f"bad kernel key {v.value!r}"[:200])
        return v.value
    if not isinstance(v, str) or not _KERNEL_KEY.fullmatch(v):
        raise PlanError("plan.json", f"bad kernel key {v!r}"[:200])
    return v


def read_plan_doc(files: Mapping[str, bytes], target: str) -> Field:
    """The artifact's plan.json for ``target``, parsed and checked at the top level."""
    tf = target_files(files)
    if "plan.json" not in tf:
        raise PlanError(tf.path("plan.json"), f"missing: a {target} artifact needs it")
    doc = parse(tf["plan.json"], tf.path("plan.json"))
    doc.obj()
    if doc["format"].value != PLAN_FORMAT or doc["target"].value != target:
        doc.fail(f"not a {target} plan of format {PLAN_FORMAT}")
    doc["functions"].list()
    return doc


def read_function_plans(doc: Field) -> dict[str, FunctionPlan]:
    """plan.json's function plans by name (a repeated name is an ArtifactError naming it)."""
    plans: dict[str, FunctionPlan] = {}
    for f in doc["functions"].list():
        plan = FunctionPlan.from_json(f)
        if plan.name in plans:
            f["name"].fail(f"function {plan.name!r} appears twice")
        plans[plan.name] = plan
    return plans


def read_native_spec(doc: Field, key: str) -> NativeSpec | None:
    """The instruction-set record plan.json keeps under ``key`` (None where it has none)."""
    if not doc.has(key):
        return None
    try:
        return NativeSpec.from_json(doc[key].value)
    except ValueError as e:
        doc[key].fail(str(e))
