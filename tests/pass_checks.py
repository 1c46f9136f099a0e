"""Shared checks for the pass tests: run passes through a verifying PassManager, compare
interpreter results bit for bit."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bitsmith.ir import Module, evaluate
from bitsmith.passes import Pass, PassManager


def run_passes(module: Module, *passes: Pass) -> Module:
    """Runs the passes with verification after each one (PassManager's default)."""
    return PassManager(passes).run(module)


def assert_bitwise_equal(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> None:
    """Same dtypes, shapes and bytes: NaNs with their payloads and signed zeros included."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        assert (g.dtype, g.shape) == (w.dtype, w.shape)
        assert np.ascontiguousarray(g).tobytes() == np.ascontiguousarray(w).tobytes(), (g, w)


def assert_same_results(before: Module, after: Module, args: Sequence[np.ndarray]) -> None:
    with np.errstate(all="ignore"):
        assert_bitwise_equal(evaluate(after, args), evaluate(before, args))
