"""The KV cache updated in place on CPU: a variant of ``main``'s plan over capacity-sized caches.

``main`` (kv-cache pass) takes ``past`` caches and returns ``present = concat(past, new)``: each
decode step copies every layer's whole cache into fresh arrays (O(length) bytes per token). The
variant derived here from the same plan, with the same kernels but two, runs on caches
[batch, kv_heads, C, head_dim] that a ``KVSession`` owns for one generation:

* each concat kernel (rope + permute + concat, fused) is called with an empty ``past``
  [batch, kv_heads, 0, head_dim]: ``concat(empty, new)`` is just the step's new keys;
* ``kv_write`` (below) stores them at slots [t - seq, t) of the cache, in place, t being the
  attention mask's length (the live length: prompt and tokens so far);
* attention reads the cache through the ``capacity`` form of the attention kernel, which takes
  t from the mask and reads only slots [0, t), in the order the compact kernel reads its keys.

Slot j of the cache holds what column j of ``present`` holds on the concat path, so the mask,
the positions and ragged (left-padded) batches mean the same, and logits are bit-identical
(tests/test_kv_inplace.py). The same idea as tvm-cuda's device decode (``cuda_decode``: fixed
capacity, the mask hiding slots not written), without its full-capacity ``present`` copy.

The variant is stored in plan.json (``kv_inplace``) with its two kinds of kernels; artifacts
without it (older ones) decode on the concat path. The variant's caches are written by its
kernels, so ``KVInplaceExecutor`` refuses any argument that a kernel would not get as is (a
copy would lose the write) or a live length beyond the capacity (a write past the buffer).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from tvm.script import tirx as T

from ...errors import BitsmithError
from ...ir import symbolic as sym
from ...ir.graph import Function, Node
from ...ir.traits import ATTENTION, has_trait
from .binder import ExecutionError
from .executor import ALIGN, aligned_empty
from .kernel import KernelDef, Recipe
from .last_logits import KEY as LAST_KEY
from .plan import Call, FunctionPlan, View

FUNCTION = "main"
KEY = "main:kv-inplace"           # the variant's executor key (``HostBuild.executors``)
PLAN_FIELD = "kv_inplace"         # plan.json: [variant plan], absent in older artifacts
PAST, KV_LEN, KV_CAPACITY = "past", "kv_len", "kv_capacity"
MASK_PARAM = "attention_mask"     # the kv-cache pass's name (passes/kv_cache.py)
CACHE_PREFIX, PRESENT_PREFIX = "past_", "present_"


class KVInplaceUnavailable(BitsmithError):
    """``main``'s plan has a shape the in-place variant does not cover (the message says which)."""


def kv_write_kernel(dtype: str, mask_dtype: str, cache_dtype: str | None = None) -> KernelDef:
    """cache[b, h, t - s + i, d] = new[b, h, i, d] for i < s, t = the mask's length; slots outside
    [0, capacity) are skipped (the executor refuses such a t before any kernel runs). A cache of
    another float type (``kv_dtype``) gets the values rounded to it (nearest even)."""
    cache_dtype = None if cache_dtype in (None, dtype) else str(cache_dtype)
    args = (str(dtype), str(mask_dtype)) + ((cache_dtype,) if cache_dtype else ())
    return KernelDef(f"kv_write_{dtype}_mask_{mask_dtype}{'_to_' + cache_dtype if cache_dtype else ''}",
                     Recipe(kv_write_func, args), "injective")


def kv_write_func(dtype: str, mask_dtype: str, cache_dtype: str | None = None) -> Any:
    cdt = cache_dtype or dtype

    @T.prim_func(s_tir=True)
    def kv_write(var_new: T.handle, var_mask: T.handle, var_cache: T.handle):
        b, h, s, d, t, c = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        new = T.match_buffer(var_new, (b, h, s, d), dtype)
        T.match_buffer(var_mask, (b, t), mask_dtype)
        cache = T.match_buffer(var_cache, (b, h, c, d), cdt)
        for bi, hi, i, di in T.grid(b, h, s, d):
            with T.sblock("write"):
                vb, vh, vi, vd = T.axis.remap("SSSS", [bi, hi, i, di])
                if t - s + vi >= T.int64(0) and t - s + vi < c:
                    cache[vb, vh, t - s + vi, vd] = T.Cast(cdt, new[vb, vh, vi, vd])

    return kv_write


@dataclass(frozen=True)
class CacheSpec:
    """One cache parameter of the variant: its place in the arguments, kv heads, head dim, dtype."""

    index: int
    heads: int
    dim: int
    dtype: np.dtype


def derive_plan(fn: Function, plan: FunctionPlan, attention_kernel: Callable[[Node], KernelDef],
                kernels: dict[str, KernelDef], kv_dtype: str | None = None) -> FunctionPlan:
    """The in-place variant of ``plan`` (``fn``'s lowering, see the module doc). New kernels are
    added to ``kernels`` (digest -> KernelDef, as ``lower_function`` returns them);
    ``attention_kernel(node)`` is the capacity form of ``node``'s attention kernel.
    KVInplaceUnavailable where the plan is not the kv-cache pass's shape. ``kv_dtype``: the caches'
    float type when it differs from the model's (keys and values rounded to it when written;
    ``attention_kernel`` must then read that type)."""
    names = [p.name for p in fn.params]
    if fn.name != FUNCTION or not names or names[-1] != MASK_PARAM:
        raise KVInplaceUnavailable(f"function {fn.name!r} has no trailing {MASK_PARAM}")
    slot_of_param = dict(zip(names, plan.params))
    slot_of_result = dict(zip(fn.results, plan.results))
    mask = slot_of_param[MASK_PARAM]
    caches = [p for p in fn.params if p.name.startswith(CACHE_PREFIX)]
    if not caches:
        raise KVInplaceUnavailable("main has no past caches")
    present: dict[int, int] = {}  # present slot -> cache slot
    for p in caches:
        r = slot_of_result.get(PRESENT_PREFIX + p.name[len(CACHE_PREFIX):])
        if r is None:
            raise KVInplaceUnavailable(f"no present result for {p.name}")
        present[r] = slot_of_param[p.name]
    steps = plan.steps
    producer: dict[int, int] = {}  # slot -> index of the step making it
    shape_of: dict[int, int] = {}  # slot -> shape id of a step output
    readers: dict[int, list[int]] = {}
    for k, s in enumerate(steps):
        ins = s.inputs if isinstance(s, Call) else [s.src]
        for i in ins:
            readers.setdefault(i, []).append(k)
        if isinstance(s, Call):
            for slot, shape, _ in s.outputs:
                producer[slot], shape_of[slot] = k, shape
    attention_steps = [k for k, s in enumerate(steps)
                       if isinstance(s, Call) and any(i in present for i in s.inputs)
                       and k not in {producer.get(r) for r in present}]
    for r, c in present.items():
        k = producer.get(r)
        if k is None or readers.get(c) != [k]:
            raise KVInplaceUnavailable(f"cache slot {c} is not read by exactly the kernel that makes present slot {r}")
        if not set(readers.get(r, [])) <= set(attention_steps) or plan.results.count(r) != 1:
            raise KVInplaceUnavailable(f"present slot {r} is read by something other than attention")
    nodes = [n for n in fn.nodes if has_trait(n.op, ATTENTION)]
    if len(nodes) != len(attention_steps):
        raise KVInplaceUnavailable(f"{len(nodes)} attention nodes but {len(attention_steps)} attention steps")
    present_shapes = {shape_of[r] for r in present}
    for sid, dims in enumerate(plan.shapes):  # past = 0 in the variant: only presents may use it
        if sid not in present_shapes and any(isinstance(d, str) and PAST in sym.symbols(d) for d in dims):
            raise KVInplaceUnavailable(f"shape {dims} depends on {PAST} beyond the caches")

    out = copy.deepcopy(plan)
    num_slots = out.num_slots
    empties: dict[tuple, int] = {}  # (dims, dtype) of an empty past -> its (new parameter) slot
    types = dict(zip(out.params, out.param_types))
    for c in present.values():
        dims, dt = types[c]
        key = (tuple(dims), dt)
        if key not in empties:
            empties[key] = num_slots
            num_slots += 1
        types[c] = ([dims[0], dims[1], KV_CAPACITY, dims[3]], kv_dtype or dt)
    mask_dims, mask_dt = types[mask]
    types[mask] = ([mask_dims[0], KV_LEN], mask_dt)
    write_keys: dict[str, str] = {}
    new_steps: list[Call | View] = []
    for k, s in enumerate(out.steps):
        if k in attention_steps:
            node = nodes[attention_steps.index(k)]
            kdef = attention_kernel(node)
            if not kdef.name.startswith(s.name + "_kvcap"):
                raise KVInplaceUnavailable(f"attention step {k} ({s.name}) does not match node {node.loc}")
            kernels.setdefault(kdef.digest(), kdef)
            s.kernel, s.name = kdef.digest(), kdef.name
            s.inputs = [present.get(i, i) for i in s.inputs]
            if len(s.inputs) != 4 or s.inputs[3] != mask:
                raise KVInplaceUnavailable(f"attention step {k} does not read {MASK_PARAM}")
        new_steps.append(s)
        if isinstance(s, Call) and any(o[0] in present for o in s.outputs):
            for c in set(s.inputs) & set(present.values()):
                dims0, dt0 = plan.param_types[plan.params.index(c)]  # the concat's past: the model's type
                s.inputs = [empties[(tuple(dims0), dt0)] if i == c else i for i in s.inputs]
            for slot, _, dt in s.outputs:
                if slot not in present:
                    continue
                if dt not in write_keys:
                    kdef = kv_write_kernel(dt, mask_dt, kv_dtype)
                    kernels.setdefault(kdef.digest(), kdef)
                    write_keys[dt] = kdef.digest()
                new_steps.append(Call(write_keys[dt], [slot, mask, present[slot]], [], None,
                                      f"kv_write_{dt}" + (f"_to_{kv_dtype}" if kv_dtype else "")))
    out.steps = new_steps
    out.num_slots = num_slots
    out.param_types = [types[p] for p in out.params] + [(list(d), dt) for d, dt in empties]
    out.params = list(out.params) + list(empties.values())
    out.results = [r for r in plan.results if r not in present]
    out.check()
    return out


def cache_specs(plan: FunctionPlan, base: FunctionPlan) -> tuple[list[CacheSpec], int, list[tuple]]:
    """From a variant and the plan it came from: its cache parameters, the mask's index, and the
    (dims, dtype) of each trailing empty ``past`` parameter."""
    n = len(base.params)
    specs = [CacheSpec(k, int(d[1]), int(d[3]), np.dtype(dt)) for k, (d, dt) in enumerate(plan.param_types[:n])
             if len(d) == 4 and d[2] == KV_CAPACITY]
    return specs, n - 1, plan.param_types[n:]


class KVInplaceExecutor:
    """The variant's plan executor behind the checks that keep its in-place writes in bounds and
    visible (module doc). ``run(ids, positions, *caches, mask)`` -> [logits]."""

    def __init__(self, inner: Any, base: FunctionPlan, key: str = KEY) -> None:
        self.inner, self.plan, self.key = inner, inner.plan, key
        self.caches, self.mask_index, self._empty_types = cache_specs(self.plan, base)

    def _args(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        args = list(args)
        key = self.key
        if len(args) != self.mask_index + 1:
            raise ExecutionError(f"{key} takes {self.mask_index + 1} inputs, got {len(args)}")
        ids, mask = np.asarray(args[0]), np.asarray(args[self.mask_index])
        if ids.ndim != 2 or mask.ndim != 2:
            raise ExecutionError(f"{key}: ids and mask must be [batch, n], got {ids.shape} and {mask.shape}")
        live, seq, b = mask.shape[1], ids.shape[1], ids.shape[0]
        if seq < 1:  # nothing to write, and the last-logits variant would read row -1
            raise ExecutionError(f"{key}: a step takes at least one token, got ids of shape {ids.shape}")
        for c in self.caches:
            a = args[c.index]
            if not (isinstance(a, np.ndarray) and a.dtype == c.dtype and a.ndim == 4 and a.flags.writeable
                    and a.flags.c_contiguous and a.size and a.ctypes.data % ALIGN == 0):
                raise ExecutionError(f"{key}: cache input {c.index} must be a writable, C-contiguous, "
                                     f"{ALIGN}-byte aligned {c.dtype} array (KVSession makes them)")
            if not seq <= live <= a.shape[2]:
                raise ExecutionError(f"{key}: live length {live} (mask) must be in [{seq}, capacity "
                                     f"{a.shape[2]}] of cache input {c.index}")
        empties = [aligned_empty(tuple(b if isinstance(x, str) and x != PAST else 0 if x == PAST else x
                                       for x in dims), np.dtype(dt)) for dims, dt in self._empty_types]
        return args + empties

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.inner.run(self._args(args))

    def run_python(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        run = getattr(self.inner, "run_python", self.inner.run)
        return run(self._args(args))


class KVSession:
    """One generation's capacity-sized caches and the variant that writes them (``run(key, args)``
    is the executable's run, so its thread settings apply). Not shared between threads: every
    ``generate`` call makes its own, so concurrent generations never share a cache. ``last``: the
    executor of the last-position-logits variant (``last_logits``), None for older artifacts."""

    def __init__(self, run: Callable[[str, Sequence[np.ndarray]], list[np.ndarray]],
                 executor: KVInplaceExecutor, last: KVInplaceExecutor | None = None) -> None:
        self._run, self.specs = run, executor.caches
        self._last_key = LAST_KEY if last is not None else None
        self.caches: list[np.ndarray] = []

    def start(self, batch: int, capacity: int) -> None:
        """Fresh caches for ``batch`` rows of up to ``capacity`` tokens (zeros: never read before
        they are written, but deterministic)."""
        self.caches = []
        for c in self.specs:
            a = aligned_empty((batch, c.heads, capacity, c.dim), c.dtype)
            a[...] = 0
            self.caches.append(a)

    @property
    def capacity(self) -> int:
        return int(self.caches[0].shape[2]) if self.caches else 0

    def step(self, ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray,
             last_only: bool = False) -> np.ndarray:
        """Logits of ``ids`` [batch, seq], whose keys go to slots [t - seq, t), t = the mask's length.
        ``batch`` may be less than the caches' rows: the step runs on their first ``batch`` rows
        (a leading slice of a C-contiguous array is one, at the same address) and leaves the
        others alone (spare rows: ``DecodeBatch``'s headroom). ``last_only``: logits [batch, 1,
        vocab] of the last position only (what generation reads; computed alone where the
        artifact has the variant, else sliced)."""
        if not self.caches:
            raise ValueError("KVSession.step before start()")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        rows = self.caches[0].shape[0]
        if not 1 <= ids.shape[0] <= rows:
            raise ValueError(f"batch {ids.shape[0]} but the session holds caches for {rows} rows")
        caches = self.caches if ids.shape[0] == rows else [c[:ids.shape[0]] for c in self.caches]
        if last_only and self._last_key is not None and ids.shape[1] > 1:
            (logits,) = self._run(self._last_key, [ids, pos, *caches, mask])
            return logits
        (logits,) = self._run(KEY, [ids, pos, *caches, mask])
        return logits[:, -1:] if last_only else logits
