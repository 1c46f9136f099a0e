"""Device-resident decode for tvm-cuda: a fixed-capacity KV cache on the GPU and one launch per step.

``main`` (kv-cache pass) takes ``past`` caches and returns ``present = concat(past, new)``;
run as a plain function it grows every cache by one each step and copies all of them to
and from the host. Here the caches stay on the device at a fixed capacity ``C``:

* past buffers are [batch, kv_heads, C - 1, head_dim], allocated once; ``main`` runs with
  ``past = C - 1`` every step, so every shape, and so every buffer address, is the same;
* the attention mask [batch, C] (``main``'s last input) hides the slots not yet written;
  decode attention reads each key with its own rotary position already applied, so the
  order of the slots does not matter, only which are visible;
* after ``main``, ``kv_append`` (``kv_append.py``) copies the new key/value (present index
  C - 1) into slot ``prompt + step``, read from a device buffer.

So each step changes only the contents of a few small input buffers (ids, positions, mask,
slot) and its launches are always the same: they are captured once as a CUDA graph
(``cuda_graph``) and replayed per token. Where capture is unavailable the same launches run
one by one on the same buffers (``mode == "kernels"``, ``fallback_reason`` says why).
``StaticCacheLayout`` is the host bookkeeping, target-neutral (tested on the reference target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...errors import BitsmithError
from ...runtime.generate import MASK_PARAM, round_capacity, stop_ids
from ...runtime.padding import check_attention_mask
from .binder import check_token_ids
from .cuda_graph import CudaGraphUnavailable, StreamGraph



class DeviceDecodeUnavailable(BitsmithError):
    """This artifact cannot decode with a device-resident cache (the message says why)."""


@dataclass(frozen=True)
class StaticCacheLayout:
    """Which cache slot, mask and positions each decode step uses (see the module docstring).

    ``prompt_mask`` [batch, prompt] (1 = token, 0 = left padding). Decode step k (k = 0 feeds
    the token the prefill chose) writes slot ``prompt + k`` and may run while that slot is
    below ``capacity - 1`` (index ``capacity - 1`` of present is the step's own token)."""

    prompt_mask: np.ndarray
    capacity: int

    def __post_init__(self) -> None:
        if self.prompt_mask.ndim != 2 or self.capacity < self.prompt_mask.shape[1] + 1:
            raise ValueError(f"capacity {self.capacity} cannot hold a prompt of {self.prompt_mask.shape[1]} tokens "
                             f"and one decode step")

    @property
    def prompt(self) -> int:
        return int(self.prompt_mask.shape[1])

    @property
    def max_steps(self) -> int:
        return self.capacity - 1 - self.prompt

    def slot(self, step: int) -> int:
        if not 0 <= step < self.max_steps:
            raise ValueError(f"decode step {step} is beyond the cache capacity {self.capacity} "
                             f"(prompt {self.prompt}: at most {self.max_steps} steps)")
        return self.prompt + step

    def mask(self, step: int) -> np.ndarray:
        """[batch, capacity] int64: the prompt's mask, the tokens decoded so far, the step's own."""
        b = self.prompt_mask.shape[0]
        m = np.zeros((b, self.capacity), np.int64)
        m[:, :self.prompt] = self.prompt_mask
        m[:, self.prompt:self.slot(step)] = 1
        m[:, self.capacity - 1] = 1
        return m

    def positions(self, step: int) -> np.ndarray:
        """[batch, 1] int64: each row's real tokens before this one (as ``mask_positions``)."""
        return (self.prompt_mask.sum(axis=1, dtype=np.int64) + step)[:, None]

    def past_from_prefill(self, present: np.ndarray) -> np.ndarray:
        """A prefill's present [b, h, prompt, d] placed in a zeroed past [b, h, capacity - 1, d]."""
        b, h, p, d = present.shape
        out = np.zeros((b, h, self.capacity - 1, d), present.dtype)
        out[:, :, :p] = present
        return out


@dataclass
class DecodeTimings:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0


class DeviceDecoder:
    """Greedy decode of one tvm-cuda ``main`` with the cache on the device (module docstring).

    ``executor``: the CudaPlanExecutor of ``main``; ``module``: the artifact's module (names
    its parameters); ``append``: cache dtype -> loaded kv_append kernel; ``graphs``: capture the
    step as a CUDA graph (False: per-kernel launches, e.g. to measure what capture saves)."""

    def __init__(self, executor: Any, module: Any, append: Mapping[str, Callable[..., None]], device: Any,
                 graphs: bool = True, graph_factory: Callable[[Any], StreamGraph] = StreamGraph) -> None:
        params = module.function("main").params
        if not params or params[-1].name != MASK_PARAM:
            raise DeviceDecodeUnavailable("this artifact's main has no attention_mask input (compiled before "
                                          "issue 14): a fixed-capacity cache needs it; recompile the model")
        self.cache_params = params[2:-1]
        missing = sorted({p.type.dtype for p in self.cache_params} - set(append))
        if missing:
            raise DeviceDecodeUnavailable(f"this artifact has no kv_append kernel for cache dtype(s) {missing} "
                                          f"(compiled before device-resident decode); recompile the model")
        import tvm
        self.tvm, self.executor, self.module, self.device = tvm, executor, module, device
        self.append = append
        self.vocab = self._vocab_bound(executor.plan)
        self.want_graphs, self._graph_factory = graphs, graph_factory
        self.mode = "kernels"
        self.fallback_reason: str | None = None if graphs else "CUDA graphs disabled by the caller"
        self._graph: StreamGraph | None = None
        self._shape: tuple[int, int] | None = None   # (batch, capacity) the buffers and graph were made for
        self._pool: dict[tuple[int, int], Any] = {}
        self.timings = DecodeTimings()

    @staticmethod
    def _vocab_bound(plan: Any) -> int | None:
        ids = plan.params[0]
        bounds = [s.check_ids[1] for s in plan.steps if getattr(s, "check_ids", None) and s.check_ids[0] == ids]
        return min(bounds) if bounds else None

    # ------------------------------------------------------------ buffers and graph

    def _buffers(self, batch: int, capacity: int) -> None:
        if self._shape == (batch, capacity):
            return
        if self._graph is not None:
            self._graph.close()
        self._graph, self._pool = None, {}
        empty = self.tvm.runtime.empty
        self.ids = empty((batch, 1), "int64", self.device)
        self.pos = empty((batch, 1), "int64", self.device)
        self.mask = empty((batch, capacity), "int64", self.device)
        self.slot = empty((batch,), "int64", self.device)
        self.past = []
        for p in self.cache_params:
            kv_heads, head_dim = int(p.type.shape[1]), int(p.type.shape[3])
            self.past.append(empty((batch, kv_heads, capacity - 1, head_dim), p.type.dtype, self.device))
        self._shape = (batch, capacity)
        self.mode = "kernels"

    def _step(self) -> None:
        outs = self.executor.run_static([self.ids, self.pos, *self.past, self.mask], self._pool)
        self.logits = outs[0]
        for p, present, past in zip(self.cache_params, outs[1:], self.past):
            self.append[p.type.dtype](present, self.slot, past)

    def _launch_step(self) -> None:
        """One decode step on the current buffer contents: replayed graph, or captured now after
        a warm-up, or per-kernel launches."""
        g = self._graph
        if g is not None and g.captured:
            g.replay()
            g.synchronize()
            return
        if g is None and self.want_graphs and self.fallback_reason is None:
            try:
                g = self._graph = self._graph_factory(self.device)
            except CudaGraphUnavailable as e:
                self.fallback_reason = str(e)
        if g is None:
            self._step()
            self.device.sync()
            return
        g.run(self._step)  # warm-up: loads modules, fills the pool, and is this step's real work
        g.synchronize()
        if self.want_graphs and self.fallback_reason is None:
            try:
                g.capture(self._step)
                self.mode = "graph"
            except CudaGraphUnavailable as e:
                self.fallback_reason = str(e)

    # ------------------------------------------------------------ decoding

    def prefill(self, input_ids: np.ndarray, layout: StaticCacheLayout) -> np.ndarray:
        """Runs the prompt, fills the device caches; returns the last position's logits [b, vocab]."""
        from ...runtime.padding import mask_positions
        b = input_ids.shape[0]
        empty_past = [np.zeros((b, int(p.type.shape[1]), 0, int(p.type.shape[3])), np.float32)
                      for p in self.cache_params]
        logits, *present = self.executor.run([input_ids, mask_positions(layout.prompt_mask), *empty_past,
                                              layout.prompt_mask])
        self._buffers(b, layout.capacity)
        for buf, p, pres in zip(self.past, self.cache_params, present):
            buf.copyfrom(layout.past_from_prefill(pres.astype(p.type.dtype)))
        return logits[:, -1]

    def decode_step(self, tokens: np.ndarray, layout: StaticCacheLayout, step: int) -> np.ndarray:
        """Feeds ``tokens`` [batch] as decode step ``step``; returns logits [batch, vocab] (float32)."""
        b = tokens.shape[0]
        ids = tokens.reshape(b, 1).astype(np.int64)
        if self.vocab is not None:
            check_token_ids(ids, self.vocab)
        self.ids.copyfrom(ids)
        self.pos.copyfrom(layout.positions(step))
        self.mask.copyfrom(layout.mask(step))
        self.slot.copyfrom(np.full(b, layout.slot(step), np.int64))
        self._launch_step()
        return self.logits.numpy()[:, -1].astype(np.float32)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None,
                 eos_token_id: int | Sequence[int] | None = None, capacity: int | None = None) -> np.ndarray:
        """Greedy [batch, prompt + new] ids, like ``runtime.generate.decode_generate``; rows that
        produced an eos id are padded with the first one."""
        import time
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0 or max_new_tokens < 1:
            raise ValueError(f"input_ids must be [batch, seq >= 1] and max_new_tokens >= 1, got {ids.shape}, "
                             f"{max_new_tokens}")
        mask = np.ones(ids.shape, np.int64) if attention_mask is None else check_attention_mask(attention_mask, ids.shape)
        cap = capacity or round_capacity(ids.shape[1] + max_new_tokens)
        layout = StaticCacheLayout(mask, cap)
        if max_new_tokens - 1 > layout.max_steps:
            raise ValueError(f"capacity {cap} holds at most {layout.max_steps + 1} new tokens after this prompt")
        eos = stop_ids(eos_token_id)
        t0 = time.perf_counter()
        nxt = np.argmax(self.prefill(ids, layout), axis=-1)
        t1 = time.perf_counter()
        out, finished = [nxt], np.isin(nxt, eos)
        for step in range(max_new_tokens - 1):
            if finished.all():
                break
            nxt = np.argmax(self.decode_step(nxt, layout, step), axis=-1)
            if len(eos):
                nxt = np.where(finished, eos[0], nxt)
                finished |= np.isin(nxt, eos)
            out.append(nxt)
        t2 = time.perf_counter()
        self.timings = DecodeTimings(t1 - t0, t2 - t1, len(out) - 1)
        return np.concatenate([ids, np.stack(out, axis=1)], axis=1)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
