"""The engine thread: continuous batching over one ``DecodeBatch``.

One thread owns the model. Requests wait in a bounded queue (``submit`` raises a 429
``APIError`` when it is full). At every token boundary the engine

1. drops waiting requests whose client went away or whose deadline passed,
2. admits waiting requests (prefill; the first token is sampled from the prompt's logits)
   while fewer than ``max_batch`` rows are active,
3. retires active rows whose client went away (``cancel``) or whose deadline passed,
4. steps every active row by one token (``DecodeBatch.step``) and samples each row's next
   token with its own sampler (one ``numpy`` Generator per request, so a seeded request repeats
   exactly whatever it shares the batch with: the batch's logits are batch-invariant),
5. releases the rows that finished (an eos id, a stop string, ``max_tokens``).

Events reach the request's owner through the ``sink`` callable it submitted with, which is
called on the engine thread and must not block (the server passes
``loop.call_soon_threadsafe``); the HTTP event loop therefore never waits for the model.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Protocol, Sequence

import numpy as np

from ..runtime.sampling import next_tokens
from ..runtime.text import TextStreamer
from .protocol import APIError, GenerationRequest


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str            # OpenAI finish_reason: "stop" (eos id or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = TextDelta | Finished | Failed
Sink = Callable[[Event], None]


class Batch(Protocol):
    """What the engine needs of ``bitsmith.runtime.batching.DecodeBatch`` (its ``kv_cache``
    string, when it has one, is reported by ``stats``)."""

    def admit(self, key: Hashable, prompt_ids: Sequence[int]) -> np.ndarray: ...

    def step(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, np.ndarray]: ...

    def release(self, key: Hashable) -> None: ...

    def __len__(self) -> int: ...


@dataclass(eq=False)
class Job:
    """One request inside the engine. ``cancelled`` is set from the HTTP side; everything
    below it is touched by the engine thread only."""

    request: GenerationRequest
    sink: Sink
    deadline: float
    key: int = 0
    cancelled: bool = False
    done: bool = False                  # Finished or Failed was emitted
    seen: list[int] = field(default_factory=list)
    generated: int = 0
    pending: int | None = None          # sampled, not yet fed to the batch
    streamer: TextStreamer | None = None
    rng: Any = None


class Engine:
    """Continuous batching over ``batch_factory()``; see the module docstring."""

    def __init__(self, batch_factory: Callable[[], Batch], decode: Callable[[list[int]], str],
                 eos_ids: Sequence[int], max_batch: int = 8, max_queue: int = 64,
                 timeout: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        # every request waits in the queue before a token boundary admits it: 0 would refuse all
        if max_batch < 1 or max_queue < 1 or not timeout > 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1 and timeout > 0 "
                             f"(got {max_batch}, {max_queue}, {timeout})")
        self._batch_factory, self._batch = batch_factory, batch_factory()
        self.decode, self.eos = decode, frozenset(int(i) for i in eos_ids)
        self.max_batch, self.max_queue, self.timeout, self.clock = max_batch, max_queue, timeout, clock
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[int, Job] = {}
        self._keys = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0          # decode steps run (for tests and /health)
        self.max_rows_seen = 0  # the most rows one step has carried
        self.cancels = 0        # jobs whose client went away

    # ---- HTTP side (any thread) ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bitsmith-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: GenerationRequest, sink: Sink) -> Job:
        """Queues ``request``; 429 APIError when ``max_queue`` requests already wait."""
        job = Job(request, sink, self.clock() + self.timeout)
        with self._cond:
            if self._stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy: {len(self._waiting)} requests are already waiting "
                               f"(--max-queue {self.max_queue}); retry later", type="rate_limit_exceeded",
                               code="queue_full")
            job.key = next(self._keys)
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client is gone: the job's row is freed at the next token boundary."""
        with self._cond:
            if job.done or job.cancelled:
                return
            self.cancels += 1
            job.cancelled = True
            self._cond.notify_all()

    def stats(self) -> dict[str, int | str]:
        """Counts for /health, and how the batch keeps its KV caches (``DecodeBatch.kv_cache``)."""
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps,
                    "kv_cache": getattr(self._batch, "kv_cache", "unknown")}

    # ---- engine thread ----
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    break
                now = self.clock()
                gone = [j for j in self._waiting if j.cancelled or now > j.deadline]
                for job in gone:
                    self._waiting.remove(job)
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
            try:
                self._boundary(gone, admit)
            except Exception as e:  # a bug here must not kill the thread every request waits on
                jobs = {job.key: job for job in [*admit, *self._active.values()]}.values()
                self._active.clear()
                self._batch = self._batch_factory()
                for job in jobs:
                    self._emit(job, Failed(_server_error(e)))
        for job in [*self._waiting, *self._active.values()]:
            self._emit(job, Failed(APIError(503, "the server shut down", type="server_error", code="shutting_down")))

    def _boundary(self, gone: list[Job], admit: list[Job]) -> None:
        for job in gone:
            if not job.cancelled:
                self._fail(job, _timeout_error(self.timeout, 0))
        for job in admit:
            self._admit(job)
        self._retire(self.clock())
        if self._active:
            self._step()

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            return
        req = job.request
        job.seen = list(req.prompt_ids)
        job.rng = req.sampling.generator()
        job.streamer = TextStreamer(self.decode, lambda text: self._emit(job, TextDelta(text)), req.stop)
        job.streamer.put(np.asarray(req.prompt_ids))  # the prompt comes first and is not echoed
        try:
            logits = self._batch.admit(job.key, req.prompt_ids)
        except ValueError as e:
            self._emit(job, Failed(APIError(400, str(e), param="prompt")))
            return
        except Exception as e:  # a model failure fails this request, not the server
            self._emit(job, Failed(_server_error(e)))
            return
        self._active[job.key] = job
        self._advance(job, logits)

    def _retire(self, now: float) -> None:
        for job in list(self._active.values()):
            if job.cancelled:
                self._release(job)
            elif now > job.deadline:
                self._release(job)
                self._fail(job, _timeout_error(self.timeout, job.generated))

    def _step(self) -> None:
        tokens = {key: job.pending for key, job in self._active.items()}
        self.max_rows_seen = max(self.max_rows_seen, len(tokens))
        logits = self._batch.step(tokens)  # a failure fails every row (see _loop): their state is unknown
        self.steps += 1
        for key, job in list(self._active.items()):
            self._advance(job, logits[key])

    def _advance(self, job: Job, logits: np.ndarray) -> None:
        """Samples the job's next token from ``logits`` [vocab]; finishes or keeps it pending."""
        req = job.request
        token = int(next_tokens(np.asarray(logits)[None, :], np.asarray([job.seen]), req.sampling, job.rng)[0])
        job.seen.append(token)
        job.generated += 1
        reason = None
        if token in self.eos:
            reason = "stop"
        else:
            job.streamer.put(np.asarray([token]))
            if job.streamer.stopped:
                reason = "stop"
            elif job.generated >= req.max_tokens:
                reason = "length"
        if reason is None:
            job.pending = token
            return
        job.streamer.end()
        self._release(job)
        self._emit(job, Finished(reason, len(req.prompt_ids), job.generated))

    def _release(self, job: Job) -> None:
        if self._active.pop(job.key, None) is not None:
            self._batch.release(job.key)

    def _fail(self, job: Job, error: APIError) -> None:
        self._emit(job, Failed(error))

    def _emit(self, job: Job, event: Event) -> None:
        if job.cancelled or job.done:
            return
        job.done = not isinstance(event, TextDelta)
        try:
            job.sink(event)
        except RuntimeError:  # the receiving event loop is closed: nobody listens any more
            job.cancelled = True


def _timeout_error(timeout: float, generated: int) -> APIError:
    return APIError(504, f"the request timed out after {timeout:g} s ({generated} tokens generated; "
                    "see --timeout)", type="timeout", code="timeout")


def _server_error(e: Exception) -> APIError:
    return APIError(500, f"the model failed: {type(e).__name__}: {e}", type="server_error", code="model_error")
