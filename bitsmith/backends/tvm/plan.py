"""The executor's plan: a flat, JSON-serialisable list of steps over numbered value slots.

``plan.json`` in an artifact holds one FunctionPlan per IR function. It contains only
ints and strings: slot numbers, shape templates (IR dims), kernel keys, tensor names.
Loading validates the types and never evaluates anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ...errors import BitsmithError
from ...ir.symbolic import Dim

PLAN_FORMAT = 1
EXTERN_PREFIX = "extern:"   # a Call whose kernel the executable supplies itself (not a TVM library)


class PlanError(BitsmithError):
    """A plan (usually from an artifact's plan.json) that is malformed."""


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
    def from_json(d: Any) -> "FunctionPlan":
        try:
            steps: list[Call | View] = []
            for s in d["steps"]:
                if "call" in s:
                    steps.append(Call(checked_kernel_key(s["call"]), as_ints(s["in"]),
                                      [(as_int(o[0]), as_int(o[1]), as_str(o[2])) for o in s["out"]],
                                      tuple(as_ints(s["check_ids"])) if "check_ids" in s else None,
                                      as_str(s.get("name", ""))))
                else:
                    a, b, c = as_ints(s["view"])
                    steps.append(View(a, b, c))
            consts = []
            for c in d["consts"]:
                if "tensor" in c:
                    consts.append(Const(as_int(c["slot"]), tensor=as_str(c["tensor"])))
                elif "scalar" in c:
                    v, dt = c["scalar"]
                    if not isinstance(v, (int, float, bool)):
                        raise PlanError(f"bad scalar {v!r}")
                    consts.append(Const(as_int(c["slot"]), scalar=(v, as_str(dt))))
                else:
                    consts.append(Const(as_int(c["slot"]), qlinear=as_str(c["qlinear"]), index=as_int(c["index"])))
            plan = FunctionPlan(as_str(d["name"]), as_int(d["num_slots"]), as_ints(d["params"]),
                                [([_dim(x) for x in s], as_str(dt)) for s, dt in d["param_types"]],
                                as_ints(d["results"]), [[_dim(x) for x in s] for s in d["shapes"]],
                                consts, steps, as_str(d.get("act_dtype", "float32")))
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from None
        plan.check()
        return plan

    def check(self) -> None:
        n = self.num_slots
        slots = list(self.params) + list(self.results) + [c.slot for c in self.consts]
        for s in self.steps:
            if isinstance(s, Call):
                slots += s.inputs + [o[0] for o in s.outputs]
                if any(not 0 <= o[1] < len(self.shapes) for o in s.outputs):
                    raise PlanError("shape id out of range")
            else:
                slots += [s.src, s.dst]
                if not 0 <= s.shape < len(self.shapes):
                    raise PlanError("shape id out of range")
        if any(not 0 <= x < n for x in slots):
            raise PlanError(f"slot out of range [0, {n})")


def as_int(x: Any) -> int:
    if not isinstance(x, int) or isinstance(x, bool):
        raise PlanError(f"expected an int, got {x!r}")
    return x


def as_ints(xs: Any) -> list[int]:
    if not isinstance(xs, list):
        raise PlanError(f"expected a list, got {xs!r}")
    return [as_int(x) for x in xs]


def as_str(x: Any) -> str:
    if not isinstance(x, str):
        raise PlanError(f"expected a string, got {x!r}")
    return x


def _dim(x: Any) -> Dim:
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise PlanError(f"expected a dim, got {x!r}")
    return x


_KERNEL_KEY = re.compile(r"[0-9a-f]{64}|" + re.escape(EXTERN_PREFIX) + r"[A-Za-z0-9_.:/%-]{1,200}")


def checked_kernel_key(v: Any) -> str:
    """A cache digest (it names a file under kernels/) or an extern name; nothing path-like."""
    if not isinstance(v, str) or not _KERNEL_KEY.fullmatch(v):
        raise PlanError(f"plan.json: bad kernel key {v!r}")
    return v


def read_plan_doc(files: Mapping[str, bytes], target: str) -> dict[str, Any]:
    """The artifact's plan.json for ``target``, parsed and checked at the top level."""
    if "plan.json" not in files:
        raise BitsmithError(f"{target} artifact lacks plan.json")
    try:
        doc = json.loads(files["plan.json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise PlanError(f"plan.json is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT or doc.get("target") != target \
            or not isinstance(doc.get("functions"), list):
        raise PlanError(f"plan.json: not a {target} plan of format {PLAN_FORMAT}")
    return doc
