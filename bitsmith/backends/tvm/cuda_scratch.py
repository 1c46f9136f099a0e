"""Scratch buffers: intermediates of a kernel turned into extra parameters.

CUDA kernels cannot allocate global memory, and a kernel's row-sized intermediates with a
dynamic extent (attention's scores, kv_len floats per query row) fit neither registers nor
static shared memory. Such an intermediate becomes a parameter placed just before the
kernel's outputs; the runtime allocates it per call from a ``ScratchSpec``: each dim is an
int or a reference (parameter index, axis) to a dim of another parameter, so the spec is
plain JSON and is evaluated from the argument shapes alone. A reference may also carry a
divisor and a cap, (index, axis, div, cap): ceil(dim / div), then at most cap (cap 0: none),
for per-chunk buffers whose extent follows a dynamic length (the split-KV attention's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tvm import s_tir, tirx as tir

from ...errors import BitsmithError

DimRef = int | tuple[int, int] | tuple[int, int, int, int]  # a constant, (index, axis) or (index, axis, div, cap)


def _ref_extent(d: tuple[int, ...], args: Sequence[Any]) -> int:
    n = int(args[d[0]].shape[d[1]])
    if len(d) == 2:
        return n
    n = -(-n // d[2])
    return min(n, d[3]) if d[3] else n


@dataclass(frozen=True)
class ScratchSpec:
    position: int            # parameter index of the scratch buffer in the new function
    dims: tuple[DimRef, ...]
    dtype: str

    def shape(self, args: Sequence[Any]) -> tuple[int, ...]:
        """The concrete shape for a call with these (inputs-only) arguments."""
        return tuple(d if isinstance(d, int) else _ref_extent(d, args) for d in self.dims)

    def to_json(self) -> dict[str, Any]:
        return {"position": self.position, "dtype": self.dtype,
                "dims": [d if isinstance(d, int) else list(d) for d in self.dims]}

    @staticmethod
    def from_json(d: Any) -> "ScratchSpec":
        try:
            dims: list[DimRef] = []
            for x in d["dims"]:
                if isinstance(x, int) and not isinstance(x, bool):
                    dims.append(x)
                elif isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
                    dims.append((x[0], x[1]))
                elif isinstance(x, list) and len(x) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in x) and x[2] >= 1 and x[3] >= 0:
                    dims.append((x[0], x[1], x[2], x[3]))
                else:
                    raise ValueError(f"bad dim {x!r}")
            pos, dtype = d["position"], d["dtype"]
            if not isinstance(pos, int) or isinstance(pos, bool) or not isinstance(dtype, str):
                raise ValueError("bad position or dtype")
        except (KeyError, TypeError, ValueError) as e:
            raise BitsmithError(f"malformed scratch spec {d!r}: {e}") from None
        return ScratchSpec(pos, tuple(dims), dtype)


def _dim_ref(dim: Any, params: Sequence[Any], limit: int) -> DimRef:
    if isinstance(dim, tir.IntImm):
        return int(dim)
    for k, p in enumerate(params[:limit]):
        for ax, d in enumerate(p.shape):
            if d.same_as(dim):
                return (k, ax)
    raise BitsmithError(f"scratch dim {dim} is not a dim of any input parameter")


def promote_to_params(func: tir.PrimFunc, names: Sequence[str], num_outputs: int = 1
                      ) -> tuple[tir.PrimFunc, list[ScratchSpec]]:
    """``func`` with the root-allocated buffers ``names`` as parameters before its outputs."""
    realize = func.body
    root = realize.block
    chosen = [b for b in root.alloc_buffers if b.name in names]
    if len(chosen) != len(names):
        raise BitsmithError(f"scratch buffers {sorted(names)} not all allocated at the root of the kernel")
    kept = [b for b in root.alloc_buffers if b.name not in names]
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, root.body, root.init,
                         kept, root.match_buffers, root.annotations)
    body = s_tir.SBlockRealize(realize.iter_values, realize.predicate, block)
    params = list(func.params)
    n_in = len(params) - num_outputs
    specs = [ScratchSpec(n_in + k, tuple(_dim_ref(d, params, n_in) for d in b.shape), str(b.dtype))
             for k, b in enumerate(chosen)]
    new_params = params[:n_in] + chosen + params[n_in:]
    return tir.PrimFunc(new_params, body, func.ret_type, func.attrs), specs
