"""qlinear operands in the tvm kernels' layout, stored in the artifact so loading skips the re-layout.

Lowering a qlinear re-slices its codes and grid tables for the kernel (``matmul.qlinear_operands``,
seconds for a whole model). The tvm-llvm artifact stores each such derived constant as raw
little-endian bytes, ``operands/<function index>/<slot>.bin``, described in plan.json by
(function, slot, file, dtype, shape); loading views those bytes (never unpickles) after checking
the description against the plan and the file's size. Artifacts without them re-derive at load.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .plan import FunctionPlan, PlanError, as_int, as_ints, as_str

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
    if not isinstance(entries, list):
        raise PlanError("plan.json: 'operands' must be a list")
    out: dict[str, dict[int, np.ndarray]] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise PlanError(f"plan.json: bad operands entry {e!r}")
        name, slot, path, dtype = as_str(e.get("function")), as_int(e.get("slot")), as_str(e.get("file")), as_str(e.get("dtype"))
        shape = as_ints(e.get("shape"))
        plan = plans.get(name)
        if plan is None or not any(c.slot == slot and c.qlinear for c in plan.consts):
            raise PlanError(f"plan.json: stored operand for {name!r} slot {slot} is not a qlinear operand of the plan")
        if dtype not in DTYPES or any(d < 0 for d in shape):
            raise PlanError(f"plan.json: stored operand {path}: bad dtype {dtype!r} or shape {shape}")
        if path not in files:
            raise PlanError(f"plan.json names {path}, which the artifact lacks")
        dt = np.dtype(dtype).newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        data = files[path]
        if len(data) != count * dt.itemsize:
            raise PlanError(f"{path}: {len(data)} bytes, but {dtype}{shape} needs {count * dt.itemsize}")
        out.setdefault(name, {})[slot] = np.frombuffer(data, dtype=dt, count=count).reshape(shape)
    return out
