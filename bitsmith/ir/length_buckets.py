"""Length buckets (FlightLLM's length-adaptive compilation): one program per bucket of lengths
instead of one per length. Prefill lengths round up to ``prefill_step``, a decode step's KV
(past) length to ``kv_step``, up to ``max_length``. Shared by the ``length_adaptive`` pass
(which records the plan on a function) and the backends that specialise on lengths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BUCKETS_ATTR = "length_buckets"


class LengthBucketError(ValueError):
    """A length outside every bucket, or an invalid bucket plan."""


@dataclass(frozen=True)
class Bucket:
    """``phase`` static | prefill | decode, with the padded ``seq`` and ``past`` lengths."""

    phase: str
    seq: int
    past: int

    @property
    def key(self) -> str:
        return f"{self.phase}:{self.seq}:{self.past}"


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass(frozen=True)
class LengthBuckets:
    prefill_step: int = 128
    kv_step: int = 16
    max_length: int = 2048

    def __post_init__(self) -> None:
        for k in ("prefill_step", "kv_step", "max_length"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LengthBucketError(f"length buckets: {k} must be an int >= 1, got {v!r}")

    def buckets(self) -> list[Bucket]:
        """Prefill (from an empty cache) of every padded length, then a one-token decode step at
        every padded past length below ``max_length``."""
        pre = [Bucket("prefill", s, 0) for s in range(self.prefill_step, round_up(self.max_length, self.prefill_step)
                                                     + 1, self.prefill_step)]
        dec = [Bucket("decode", 1, p) for p in range(self.kv_step, round_up(self.max_length - 1, self.kv_step) + 1,
                                                     self.kv_step)]
        return pre + dec

    def bucket(self, seq: int, past: int) -> Bucket:
        if seq + past > self.max_length:
            raise LengthBucketError(f"length {seq + past} (seq {seq} + past {past}) exceeds max_length "
                                    f"{self.max_length} of the compiled buckets")
        if past == 0:
            return Bucket("prefill", round_up(max(seq, 1), self.prefill_step), 0)
        if seq == 1:
            return Bucket("decode", 1, round_up(past, self.kv_step))
        raise LengthBucketError(f"a call with {seq} new tokens after {past} cached ones fits no bucket: buckets "
                                f"cover prefill from an empty cache and one-token decode steps")

    @property
    def kv_capacity(self) -> int:
        """Cache rows every bucket's program fits (prefill up to the padded maximum, decode up to
        the largest padded past plus the new token)."""
        return max(round_up(self.max_length, self.prefill_step), round_up(self.max_length - 1, self.kv_step) + 1)

    def to_json(self) -> dict[str, int]:
        return {"prefill_step": self.prefill_step, "kv_step": self.kv_step, "max_length": self.max_length}

    @staticmethod
    def from_json(d: Any) -> "LengthBuckets":
        return LengthBuckets(int(d["prefill_step"]), int(d["kv_step"]), int(d["max_length"]))

    def to_attr(self) -> tuple[int, int, int]:
        return (self.prefill_step, self.kv_step, self.max_length)

    @staticmethod
    def from_attr(v: Any) -> "LengthBuckets":
        if not isinstance(v, tuple) or len(v) != 3:
            raise LengthBucketError(f"{BUCKETS_ATTR} attribute must be (prefill_step, kv_step, max_length), got {v!r}")
        return LengthBuckets(*(int(x) for x in v))
