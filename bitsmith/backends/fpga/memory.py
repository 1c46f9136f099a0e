"""Memory planning: address spaces, first-fit arenas with reuse, and value views.

HBM holds, from address 0: the constant image (weights, norms, tables), then per program the
I/O region (token ids, positions), the KV cache (one region per past/present pair, laid out
per head with a stride of the bucket's capacity so a decode step appends in place) and the
activation arena. The on-chip activation buffer (A + GLOBAL) is a second space: a decode
program keeps activations there ("always-on-chip decode", FlightLLM) when they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .isa import ADDR_UNIT

HBM, ONCHIP = 0, 1


def align(n: int) -> int:
    return -(-n // ADDR_UNIT) * ADDR_UNIT


@dataclass(frozen=True)
class View:
    """Where a value lives: space, byte address, shape, element strides, dtype."""

    space: int
    addr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: str

    @staticmethod
    def contiguous(space: int, addr: int, shape: tuple[int, ...], dtype: str) -> "View":
        strides, acc = [], 1
        for d in reversed(shape):
            strides.append(acc)
            acc *= d
        return View(space, addr, tuple(shape), tuple(reversed(strides)), dtype)

    @property
    def is_contiguous(self) -> bool:
        return self == View.contiguous(self.space, self.addr, self.shape, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def extent(self) -> int:
        """Bytes from addr to one past the last element."""
        if not self.shape or 0 in self.shape:
            return np.dtype(self.dtype).itemsize if not self.shape else 0
        last = sum((d - 1) * s for d, s in zip(self.shape, self.strides))
        return (last + 1) * np.dtype(self.dtype).itemsize

    def with_shape(self, shape: tuple[int, ...]) -> "View":
        return View.contiguous(self.space, self.addr, shape, self.dtype)

    def to_json(self) -> list:
        return [self.space, self.addr, list(self.shape), list(self.strides), self.dtype]

    @staticmethod
    def from_json(d: list) -> "View":
        return View(int(d[0]), int(d[1]), tuple(int(x) for x in d[2]), tuple(int(x) for x in d[3]), str(d[4]))


class Arena:
    """First-fit allocator over [base, base + capacity). ``alloc`` also returns the resource
    ids of freed blocks the new range overlaps, so their last readers can be ordered before
    the new block's first writer (write-after-read through reused memory)."""

    def __init__(self, base: int, capacity: int | None) -> None:
        self.base, self.capacity = base, capacity
        self.free: list[tuple[int, int]] = [(base, capacity if capacity is not None else 1 << 62)]
        self.freed: list[tuple[int, int, int]] = []   # (lo, hi, resource id) of released blocks
        self.high = base

    def alloc(self, nbytes: int) -> tuple[int, list[int]] | None:
        size = align(max(nbytes, 1))
        for i, (lo, length) in enumerate(self.free):
            if length >= size:
                self.free[i] = (lo + size, length - size)
                if self.free[i][1] == 0:
                    self.free.pop(i)
                hi = lo + size
                self.high = max(self.high, hi)
                prev = [r for a, b, r in self.freed if a < hi and lo < b]
                self.freed = [(a, b, r) for a, b, r in self.freed if not (lo <= a and b <= hi)]
                return lo, prev
        return None

    def release(self, lo: int, nbytes: int, rid: int) -> None:
        size = align(max(nbytes, 1))
        self.freed.append((lo, lo + size, rid))
        self.free.append((lo, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for a, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        self.free = merged
