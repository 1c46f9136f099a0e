"""Backend ``toy`` (target ``toy-numpy``): an example bitsmith backend plugin.

It lowers each function to a schedule of its own numpy kernels (``kernels.py``), stores the
schedule as its target file and loads it back (``schedule.py``). Registered through the
``bitsmith.backends`` entry point in pyproject.toml; docs/writing-a-backend.md walks through it.
"""

from __future__ import annotations

from typing import Any, Mapping

from bitsmith.backends import base
from bitsmith.backends.base import Backend, Executable
from bitsmith.backends.files import target_files
from bitsmith.errors import ArtifactError
from bitsmith.ir import Module, Node
from bitsmith.tolerance import Tolerance

from . import schedule as sched
from .executor import ToyExecutable
from .kernels import KERNELS

SCHEDULE_FILE = "schedule.json"
DTYPES = sched.DTYPES


def check_node(node: Node) -> str | None:
    """The attributes and types the kernels support, beyond the op name (LegalOps.check)."""
    odd = sorted({v.type.dtype for v in node.outputs} - DTYPES)
    if odd:
        return f"the toy kernels compute float32, int64 and bool only, not {', '.join(odd)}"
    return None


class ToyBackend(Backend):
    name = "toy"
    targets = ("toy-numpy",)

    def pipeline(self, target: str, options: Mapping[str, Any]):
        # The API's cleanup (dce, cse, fold, dce) already ran; the schedule needs nothing more
        # than dropping what no result reads, so only a finalize phase.
        return base.Pipeline(finalize=("dce",))

    def legal_ops(self, target: str, options: Mapping[str, Any]):
        # constant steps read the module's tensors; every other op needs a kernel. Not qlinear
        # or call: compile a quantized model for another target.
        return base.LegalOps(ops=frozenset(KERNELS) | {"constant"}, check=check_node)

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        # float32 everywhere where the oracle sums in float64, so errors grow with depth.
        # Measured: max |diff| 2.4e-7 over 200 random modules and 1.9e-7 on the tiny llama, gpt2
        # and qwen2 logits (the conformance suite); 6.0e-4 = 1.8e-5 of max|logit| on SmolLM2's
        # 30 layers. scale_rtol 1e-4 leaves 5x on SmolLM2; a wrong kernel is off by O(max|logit|).
        return Tolerance(rtol=1e-4, atol=1e-5, scale_rtol=1e-4)

    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        return ToyExecutable(sched.lower(module), module.tensors)

    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        files = target_files(files)
        if SCHEDULE_FILE not in files:
            raise ArtifactError(files.path(SCHEDULE_FILE), "missing (target toy-numpy stores its schedule there)")
        schedules = sched.from_json(files[SCHEDULE_FILE], files.path(SCHEDULE_FILE))
        if sorted(schedules) != sorted(f.name for f in module.functions):
            raise ArtifactError(files.path(SCHEDULE_FILE), f"schedules for {sorted(schedules)} but the module "
                                                           f"has functions {sorted(f.name for f in module.functions)}")
        missing = {s.attrs.get("name") for f in schedules.values() for s in f.steps if s.op == "constant"} \
            - set(module.tensors)
        if missing:
            raise ArtifactError(files.path(SCHEDULE_FILE), f"reads tensors the artifact lacks: {sorted(missing)[:3]}")
        return ToyExecutable(schedules, module.tensors)
