"""qlinear operands in the tvm kernels' layout, stored in the artifact so loading skips the re-layout.

Lowering a qlinear re-slices its codes and grid tables for the kernel (``matmul.qlinear_operands``,
seconds for a whole model). The tvm-llvm artifact stores each such derived constant as raw
little-endian bytes, ``operands/<function index>/<slot>.bin``, described in plan.json by
(function, slot, file, dtype, shape); loading views those bytes (never unpickles) after checking
the description against the plan and the file's size. Artifacts without them re-derive at load.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from ..files import target_files
from ..json_fields import Field
from .plan import FunctionPlan, PlanError

_FILE = re.compile(r"operands/[0-9]+/[0-9]+\.bin")
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "float16", "float32")


def to_files(plans: Mapping[str, FunctionPlan], derived: Mapping[str, Mapping[int, np.ndarray]],
             ) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    index, files = [], {}
    for k, (name, plan) in enumerate(plans.items()):
        arrays = derived.get(name, {})
        for c in plan.consts:
            if c.qlinear and c.slot in arrays:
                a = np.ascontiguousarray(arrays[c.slot])
                if a.dtype.name not in DTYPES:
                    continue  # re-derived at load instead
                path = f"operands/{k}/{c.slot}.bin"
                files[path] = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
                index.append({"function": name, "slot": c.slot, "file": path, "dtype": a.dtype.name,
                              "shape": list(a.shape)})
    return index, files


def from_files(entries: Any, files: Mapping[str, bytes], plans: Mapping[str, FunctionPlan],
               ) -> dict[str, dict[int, np.ndarray]]:
    """The stored operands plan.json's ``operands`` describes, each file read once straight into an
    aligned array (``TargetFiles.read_array``); ArtifactError naming file and field otherwise."""
    files = target_files(files)
    f = entries if isinstance(entries, Field) else Field(entries, files.path("plan.json"), "operands")
    out: dict[str, dict[int, np.ndarray]] = {}
    for e in f.list():
        name, slot, path = e["function"].str(), e["slot"].int(), e["file"].str(_FILE)
        dtype = e["dtype"].str(choices=DTYPES)
        shape = e["shape"].ints(lo=0)
        plan = plans.get(name)
        if plan is None or not any(c.slot == slot and c.qlinear for c in plan.consts):
            e.fail(f"stored operand for {name!r} slot {slot} is not a qlinear operand of the plan"[:200])
        if slot in out.get(name, {}):
            e.fail(f"stored operand for {name!r} slot {slot} appears twice"[:200])
        if path not in files:
            e["file"].fail(f"names {path}, which the artifact does not list")
        count = math.prod(shape)
        need = count * np.dtype(dtype).itemsize
        if files.size(path) != need:
            raise PlanError(files.path(path), f"{files.size(path)} bytes, but {dtype}{shape} needs {need}")
        out.setdefault(name, {})[slot] = files.read_array(path, dtype, shape)
    return out
