"""Per-token time of an attention-offloaded decode step, and of the homogeneous baseline.

A decode step of batch B at context L (B new tokens over L cached ones each) costs:

- dense side: the roofline of the dense ops on the compute group (``SideProfile.seconds``);
- attention side: the roofline of the attention ops on the memory group, split by heads
  (or by sequences beyond the KV-head count), taken as ideal;
- transfer: per layer one message each way (q/k/v out, the attention output back), so
  ``2 * layers * latency + bytes / (bandwidth * lanes)``, lanes = min(compute, memory)
  devices each with its own NIC; sent and received bytes are summed (no full-duplex credit);
- without staggering the three run one after another: ``T = dense + attention + transfer``;
- with Lamina's two-micro-batch staggering (B split into halves b1, b2), each resource works
  on both halves while the other half uses the others, so ``T = max(dense(b1)+dense(b2),
  attention(b1)+attention(b2), transfer(b1)+transfer(b2), max_i dense(bi)+attention(bi)+transfer(bi))``:
  no resource does more than its own work, and no micro-batch waits less than its own chain.
  The dense weights are read once per micro-batch, so staggering costs one extra weight read.

A device's ``op_overhead`` (seconds per op; 0 for the GPU presets) adds a fixed cost per op.
A group of k devices of one preset acts as one device with k times its FLOP/s, bandwidth,
memory and price (ideal tensor parallelism: no all-reduce cost; this favours the baseline,
which needs it more). Memory: weights live on the compute group, the KV cache of every
sequence (at the context length) on the memory group; a share ``memory_utilization`` of each
device's memory is usable (vLLM's default ``gpu_memory_utilization`` is 0.9); activations
are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .presets import DevicePreset, LinkPreset
from .profile import DecodeProfile, SideProfile, decode_bindings


@dataclass(frozen=True)
class Assumptions:
    memory_utilization: float = 0.9
    stagger: bool = True


@dataclass(frozen=True)
class Group:
    """``count`` devices of one preset used as one."""

    device: DevicePreset
    count: int

    @property
    def peak_flops(self) -> float:
        return self.device.peak_flops * self.count

    @property
    def bandwidth(self) -> float:
        return self.device.memory_bandwidth * self.count

    @property
    def memory(self) -> float:
        return self.device.memory_bytes * self.count

    @property
    def dollars_per_hour(self) -> float:
        return self.device.dollars_per_hour * self.count


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one decode step (every sequence of the batch advances one token)."""

    dense: float
    attention: float
    transfer: float
    step: float


@lru_cache(maxsize=1 << 16)
def side_seconds(side: SideProfile, batch: int, context: int, group: Group) -> float:
    if batch == 0:
        return 0.0
    return side.seconds(decode_bindings(batch, context), group.peak_flops, group.bandwidth, group.device.op_overhead)


def transfer_seconds(profile: DecodeProfile, batch: int, context: int, link: LinkPreset, lanes: int = 1) -> float:
    """Both directions of every layer's exchange for ``batch`` sequences over ``lanes`` links."""
    if batch == 0:
        return 0.0
    sent, received = profile.transfer_bytes(decode_bindings(batch, context))
    return 2 * profile.layers * link.latency + (sent + received) / (link.bandwidth * lanes)


def offload_step(profile: DecodeProfile, compute: Group, memory: Group, link: LinkPreset, batch: int,
                 context: int, stagger: bool = True) -> StepTimes:
    lanes = min(compute.count, memory.count)

    def parts(b: int) -> tuple[float, float, float]:
        return (side_seconds(profile.dense, b, context, compute),
                side_seconds(profile.attention, b, context, memory),
                transfer_seconds(profile, b, context, link, lanes))

    whole = parts(batch)
    if not stagger or batch < 2:
        return StepTimes(*whole, sum(whole))
    halves = [parts(batch - batch // 2), parts(batch // 2)]
    busy = [a + b for a, b in zip(*halves)]
    step = max(*busy, *(sum(h) for h in halves))
    return StepTimes(*busy, step)


def homogeneous_step(profile: DecodeProfile, group: Group, batch: int, context: int) -> StepTimes:
    dense = side_seconds(profile.dense, batch, context, group)
    attention = side_seconds(profile.attention, batch, context, group)
    return StepTimes(dense, attention, 0.0, dense + attention)


def _fit(free_bytes: float, per_sequence: int) -> int:
    return max(0, math.floor(free_bytes / per_sequence)) if free_bytes > 0 else 0


def max_batch_offload(profile: DecodeProfile, compute: Group, memory: Group, context: int,
                      assumptions: Assumptions = Assumptions()) -> int:
    """Sequences whose KV cache fits the memory group, 0 when the weights do not fit the compute group."""
    if profile.dense_weight_bytes > compute.memory * assumptions.memory_utilization:
        return 0
    free = memory.memory * assumptions.memory_utilization - profile.attention_weight_bytes
    return _fit(free, profile.kv_bytes_per_sequence(context))


def max_batch_homogeneous(profile: DecodeProfile, group: Group, context: int,
                          assumptions: Assumptions = Assumptions()) -> int:
    """Sequences whose KV cache fits beside all the weights on the group."""
    free = (group.memory * assumptions.memory_utilization - profile.dense_weight_bytes
            - profile.attention_weight_bytes)
    return _fit(free, profile.kv_bytes_per_sequence(context))
