"""``check_pass``: what every pass owes its users, checked on one module.

1. its result verifies (run through a verifying PassManager, so a failure names the pass);
2. the reference interpreter gives the same results before and after: bit for bit when the
   pass claims exactness (``tolerance=None``), else within the stated ``Tolerance``;
3. running it again changes nothing, when the pass declares ``idempotent = True``.

Use it inside a hypothesis test over ``strategies.random_modules()`` to check a pass on many
modules, or on a hand-written module in a unit test.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PassError
from ..ir import Module, evaluate, print_module
from ..ir.symbolic import symbols
from ..ir.types import numpy_dtype
from ..passes import Pass, PassManager, parse_pass_spec
from ..tolerance import Tolerance


class PassCheckError(AssertionError):
    """A pass broke one of its promises; the message says which pass, which promise, and how."""


@dataclass(frozen=True)
class PassCheckResult:
    """What the check ran: the passes, the module they produced, whether idempotence was checked."""

    passes: tuple[str, ...]
    module: Module
    idempotence_checked: bool


def example_args(module: Module, function: str = "main", size: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Inputs for ``function``: every symbolic dim bound to ``size``, floats uniform in [-2, 2],
    integers in [0, 2) (valid token ids for any vocabulary of two or more), booleans random."""
    fn = module.function(function)
    bindings = {s: size for p in fn.params for d in p.type.shape for s in symbols(d)}
    rng = np.random.default_rng(seed)
    args = []
    for p in fn.params:
        shape, dtype = p.type.concrete(bindings), numpy_dtype(p.type.dtype)
        if dtype.kind == "f":
            args.append(rng.uniform(-2, 2, shape).astype(dtype))
        else:
            args.append(rng.integers(0, 2, shape).astype(dtype))
    return args


def _passes(pass_or_spec: Pass | str | Sequence[Pass]) -> tuple[Pass, ...]:
    if isinstance(pass_or_spec, str):
        return tuple(parse_pass_spec(pass_or_spec))
    if isinstance(pass_or_spec, Pass):
        return (pass_or_spec,)
    return tuple(pass_or_spec)


def _bitwise_mismatch(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> str | None:
    """Same count, dtypes, shapes and bytes (NaN payloads and signed zeros included)."""
    if len(got) != len(want):
        return f"{len(got)} results where {len(want)} were expected"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.ascontiguousarray(g), np.ascontiguousarray(w)
        if (g.dtype, g.shape) != (w.dtype, w.shape):
            return f"result {i}: {g.dtype}{list(g.shape)} where {w.dtype}{list(w.shape)} was expected"
        if g.tobytes() != w.tobytes():
            return f"result {i} differs in its bits (the pass claims exactness): got {g!r}, want {w!r}"
    return None


def _diff(a: Module, b: Module) -> str:
    lines = difflib.unified_diff(print_module(a).splitlines(), print_module(b).splitlines(),
                                 "after one run", "after two runs", lineterm="", n=1)
    text = "\n".join(lines)
    if not text:
        return "the printed IR is the same; the constants' data differ"
    return text if len(text) < 4000 else text[:4000] + "\n..."


def check_pass(pass_or_spec: Pass | str | Sequence[Pass], module: Module, args: Sequence[np.ndarray] | None = None,
               *, tolerance: Tolerance | None = None, idempotent: bool | None = None,
               function: str = "main") -> PassCheckResult:
    """Runs the pass(es) on ``module`` and checks the three promises; raises PassCheckError.

    ``pass_or_spec``: a Pass, a sequence of them, or a spec such as ``"fold{max_elements=64}"``.
    ``args``: inputs of ``function`` (default: ``example_args``). ``tolerance``: None demands
    bitwise-equal results (a pass that only restructures the graph); a lossy pass states how far
    results may move. ``idempotent``: None reads the pass's own ``idempotent`` class attribute
    (only for a single pass: a composition of idempotent passes need not be idempotent).
    """
    passes = _passes(pass_or_spec)
    names = tuple(p.name for p in passes)
    label = ",".join(names)
    try:
        out = PassManager(passes).run(module)  # verifies the input and every pass's output
    except PassError as e:
        raise PassCheckError(f"{label}: {e}") from e
    if args is None:
        args = example_args(module, function)
    with np.errstate(all="ignore"):
        want = evaluate(module, args, function)
        got = evaluate(out, args, function)
    why = _bitwise_mismatch(got, want) if tolerance is None else tolerance.compare(got, want)
    if why is not None:
        raise PassCheckError(f"{label} changed the results of @{function}: {why}")
    if idempotent is None:
        idempotent = len(passes) == 1 and bool(getattr(type(passes[0]), "idempotent", False))
    if idempotent:
        again = PassManager(passes).run(out)
        if again != out:
            raise PassCheckError(f"{label} declares itself idempotent but a second run changed the module:\n"
                                 f"{_diff(out, again)}")
    return PassCheckResult(names, out, idempotent)
