"""Measures this machine's read bandwidth and matmul FLOP/s with numpy (the ``cpu-server`` preset).

Run ``python -m bitsmith.offload_planning.probe`` to print a preset entry for the machine it runs
on; the numbers in ``presets.json`` came from one such run (its text says when and where).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np


Clock = Callable[[], float]


def read_bandwidth(nbytes: int = 256 << 20, repeats: int = 5, clock: Clock = time.perf_counter) -> float:
    """Bytes/s of a streaming reduction over ``nbytes`` of float64 (best of ``repeats``).
    ``clock=time.process_time`` counts only this process's CPU time: on a machine shared with
    other jobs, what the code costs when it runs rather than how long it waited."""
    a = np.ones(nbytes // 8)
    best = 0.0
    for _ in range(repeats):
        t = clock()
        a.sum()
        best = max(best, a.nbytes / max(clock() - t, 1e-9))
    return best


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: str = "float32", clock: Clock = time.perf_counter) -> float:
    """FLOP/s of an ``n``x``n`` matmul (2 n^3 per product; best of ``repeats``)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    best = 0.0
    for _ in range(repeats):
        t = clock()
        a @ b
        best = max(best, 2 * n ** 3 / max(clock() - t, 1e-9))
    return best


def memory_bytes() -> int:
    """Physical memory of this machine (POSIX sysconf)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    entry = {"peak_flops": matmul_flops(), "memory_bandwidth": read_bandwidth(), "memory_bytes": memory_bytes(),
             "cpus": os.cpu_count()}
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
