"""Chooses an attention-offloaded deployment (compute devices, attention devices, batch) per
context length, and the best homogeneous deployment of the compute device type to compare.

The objective is tokens per dollar (throughput / hourly price), ties broken by throughput.
Group sizes: compute (and homogeneous) groups of the smallest count that holds the weights,
doubled up to ``max_group`` (one 8-GPU node); attention groups of 1 .. ``max_attention``
devices. Batches: the given ones, or powers of two up to the largest that fits and that one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

from .cost_model import (Assumptions, Group, StepTimes, homogeneous_step, max_batch_homogeneous,
                         max_batch_offload, offload_step)
from .presets import DevicePreset, LinkPreset
from .profile import DecodeProfile


@dataclass(frozen=True)
class Deployment:
    kind: str  # "offload" or "homogeneous"
    compute: str
    compute_count: int
    memory: str  # "" for homogeneous
    memory_count: int
    batch: int
    context: int
    times: StepTimes
    dollars_per_hour: float

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.times.step

    @property
    def tokens_per_dollar(self) -> float:
        return self.tokens_per_second * 3600 / self.dollars_per_hour if self.dollars_per_hour else math.inf

    @property
    def attention_per_compute(self) -> float:
        return self.memory_count / self.compute_count

    def as_json(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second,
                "tokens_per_dollar": self.tokens_per_dollar}


@dataclass(frozen=True)
class PlanRow:
    context: int
    batch: int | None  # the batch asked for, None when the planner chose it
    offload: Deployment | None  # None: nothing fits
    homogeneous: Deployment | None

    @property
    def ratio(self) -> float | None:
        """Offload tokens per dollar over homogeneous tokens per dollar."""
        if self.offload is None or self.homogeneous is None:
            return None
        return self.offload.tokens_per_dollar / self.homogeneous.tokens_per_dollar


@dataclass(frozen=True)
class PlanSettings:
    max_group: int = 8
    max_attention: int = 32
    assumptions: Assumptions = Assumptions()


def _key(d: Deployment) -> tuple[float, float]:
    return d.tokens_per_dollar, d.tokens_per_second


def batch_candidates(limit: int, asked: Sequence[int] | None) -> list[int]:
    if asked is not None:
        return [b for b in asked if 1 <= b <= limit]
    out = [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]
    return sorted(set(out + ([limit] if limit >= 1 else [])))


def group_sizes(weight_bytes: float, device: DevicePreset, settings: PlanSettings) -> list[int]:
    """Counts from the smallest that holds ``weight_bytes`` (at the usable share), doubling."""
    usable = device.memory_bytes * settings.assumptions.memory_utilization
    smallest = max(1, math.ceil(weight_bytes / usable)) if weight_bytes else 1
    out, k = [], smallest
    while k <= settings.max_group:
        out.append(k)
        k *= 2
    return out


def best_homogeneous(profile: DecodeProfile, device: DevicePreset, context: int,
                     batches: Sequence[int] | None = None, settings: PlanSettings = PlanSettings()
                     ) -> Deployment | None:
    best = None
    weights = profile.dense_weight_bytes + profile.attention_weight_bytes
    for k in group_sizes(weights, device, settings):
        group = Group(device, k)
        for b in batch_candidates(max_batch_homogeneous(profile, group, context, settings.assumptions), batches):
            d = Deployment("homogeneous", device.name, k, "", 0, b, context,
                           homogeneous_step(profile, group, b, context), group.dollars_per_hour)
            best = d if best is None or _key(d) > _key(best) else best
    return best


def best_offload(profile: DecodeProfile, compute: DevicePreset, memory: DevicePreset, link: LinkPreset,
                 context: int, batches: Sequence[int] | None = None, settings: PlanSettings = PlanSettings()
                 ) -> Deployment | None:
    best = None
    for k in group_sizes(profile.dense_weight_bytes, compute, settings):
        cgroup = Group(compute, k)
        for n in range(1, settings.max_attention + 1):
            mgroup = Group(memory, n)
            limit = max_batch_offload(profile, cgroup, mgroup, context, settings.assumptions)
            for b in batch_candidates(limit, batches):
                times = offload_step(profile, cgroup, mgroup, link, b, context, settings.assumptions.stagger)
                d = Deployment("offload", compute.name, k, memory.name, n, b, context, times,
                               cgroup.dollars_per_hour + mgroup.dollars_per_hour)
                best = d if best is None or _key(d) > _key(best) else best
    return best


def plan(profile: DecodeProfile, compute: DevicePreset, memory: DevicePreset, link: LinkPreset,
         contexts: Iterable[int], batches: Sequence[int] | None = None,
         settings: PlanSettings = PlanSettings()) -> list[PlanRow]:
    """One row per context (and per asked batch, when batches are given)."""
    rows = []
    for context in contexts:
        for batch in ([None] if batches is None else list(batches)):
            asked = None if batch is None else [batch]
            rows.append(PlanRow(context, batch,
                                best_offload(profile, compute, memory, link, context, asked, settings),
                                best_homogeneous(profile, compute, context, asked, settings)))
    return rows
