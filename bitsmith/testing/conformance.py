"""The backend-conformance suite: a target's results equal the reference interpreter's within
the tolerance its backend declares (``Backend.tolerance``).

Two kinds of cases, each also run after a round trip through the backend's target files:

* random valid modules (``strategies.random_modules``), run through the passes ``compile``
  runs for the target (``pipeline_passes``), built with ``Backend.build``, then rebuilt with
  ``Backend.load`` from ``Executable.files()``; modules using an op the backend does not
  declare legal (``Backend.legal_ops``) are skipped;
* small random-init Hugging Face causal LMs (``hf_configs``), compiled with ``bitsmith.compile``
  for the target and for ``reference``, prefill and one decode step compared, then saved and
  loaded back as an artifact (``bitsmith.load``).

``backend_conformance`` runs both and raises ConformanceError naming the first case that
disagrees; ``BackendConformanceSuite`` runs the same checks as pytest tests.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..backends import backend_for_target
from ..backends.base import Backend, Executable, check_legal
from ..backends.files import BytesFiles
from ..errors import UnsupportedOpError
from ..ir import Module, evaluate, print_module
from ..passes import Pass, PassManager, parse_pass_spec
from ..tolerance import Tolerance, max_errors

RANDOM_EXAMPLES = 20
HF_ARCHS = ("llama",)


class ConformanceError(AssertionError):
    """A target's results left the tolerance its backend declares; names the case and the element."""


@dataclass(frozen=True)
class CaseResult:
    """One comparison with the reference: its name and the largest errors measured."""

    name: str
    max_abs_error: float
    max_rel_error: float


@dataclass(frozen=True)
class ConformanceReport:
    """Every case that ran against ``target`` and the tolerance it was held to."""

    target: str
    tolerance: Tolerance
    cases: tuple[CaseResult, ...]
    skipped: int = 0  # random modules with an op the backend does not declare legal

    def max_errors(self) -> tuple[float, float]:
        return (max((c.max_abs_error for c in self.cases), default=0.0),
                max((c.max_rel_error for c in self.cases), default=0.0))


def resolved_options(backend: Backend, target: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**backend.option_defaults(target), **(options or {})}


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(target options, compression options such as ``quant``) of a compile's keyword options."""
    from ..compression import CompressionOptions
    names = set(CompressionOptions.names())
    options = dict(options or {})
    return ({k: v for k, v in options.items() if k not in names}, {k: v for k, v in options.items() if k in names})


def pipeline_passes(backend: Backend, target: str, options: Mapping[str, Any]) -> list[Pass]:
    """What ``compile`` runs on a captured module for this target: the target-neutral cleanup,
    then the backend's ``Pipeline`` (legalize, lower, finalize)."""
    from ..api import DEFAULT_PIPELINE, backend_pipeline
    specs = backend_pipeline(backend, target, dict(options)).specs()
    return [p for spec in (*DEFAULT_PIPELINE, *specs) for p in parse_pass_spec(spec)]


def illegal_op(backend: Backend, target: str, options: Mapping[str, Any], module: Module) -> str | None:
    """Why the backend does not accept ``module`` (``compile``'s own check, ``check_legal``);
    None if it does."""
    try:
        check_legal(module, backend.legal_ops(target, options), target)
    except UnsupportedOpError as e:
        return str(e)
    return None


def _compare(case: str, target: str, tolerance: Tolerance, got: Sequence[np.ndarray],
             want: Sequence[np.ndarray]) -> CaseResult:
    why = tolerance.compare(got, want)
    if why is not None:
        raise ConformanceError(f"target {target}, {case}: {why}")
    return CaseResult(case, *max_errors(got, want))


def _rebuilt(backend: Backend, module: Module, target: str, options: Mapping[str, Any], exe: Executable) -> Executable:
    """The executable ``Backend.load`` makes from the built one's target files."""
    return backend.load(module, target, options, BytesFiles(exe.files()))


def check_module(module: Module, args: Sequence[np.ndarray], target: str, options: Mapping[str, Any] | None = None,
                 *, function: str = "main", name: str = "module") -> list[CaseResult] | None:
    """Builds ``module`` for ``target`` (pipeline, build, and load from its files) and compares
    ``function`` on ``args`` with the reference interpreter. None when the module uses an op
    the backend does not declare legal; raises ConformanceError on a mismatch, and lets an
    UnsupportedOpError for a declared-legal op through (a backend must build what it accepts)."""
    backend = backend_for_target(target)
    opts = resolved_options(backend, target, options)
    lowered = PassManager(pipeline_passes(backend, target, opts)).run(module)
    if illegal_op(backend, target, opts, lowered) is not None:
        return None
    tolerance = backend.tolerance(target, opts)
    with np.errstate(all="ignore"):
        want = evaluate(module, args, function)
    exe = backend.build(lowered, target, opts)
    built = _compare(f"{name} (built)", target, tolerance, exe.run(function, list(args)), want)
    loaded = _rebuilt(backend, lowered, target, opts, exe)
    return [built, _compare(f"{name} (loaded from its target files)", target, tolerance,
                            loaded.run(function, list(args)), want)]


def check_random_modules(target: str, options: Mapping[str, Any] | None = None, *,
                         examples: int = RANDOM_EXAMPLES, max_steps: int = 8) -> tuple[list[CaseResult], int]:
    """``examples`` random modules (hypothesis, derandomized: the same modules on every run)
    checked with ``check_module``. Returns the results and how many modules were skipped."""
    from hypothesis import HealthCheck, given, settings

    from .strategies import random_modules

    results: list[CaseResult] = []
    skipped = [0]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(random_modules(max_steps=max_steps))
    def run(case: tuple[Module, list[np.ndarray]]) -> None:
        module, args = case
        try:
            got = check_module(module, args, target, options, name="random module")
        except ConformanceError as e:  # hypothesis re-raises the smallest failing module's error
            raise ConformanceError(f"{e}\n{print_module(module)}") from None
        if got is None:
            skipped[0] += 1
        else:
            results.extend(got)

    run()
    if not results:
        raise ConformanceError(f"target {target}: every random module used an op its backend does not declare "
                               f"legal; the suite compared nothing")
    return results, skipped[0]


def check_hf_model(target: str, arch: str = "llama", options: Mapping[str, Any] | None = None,
                   *, batch: int = 2, seq: int = 5, seed: int = 0) -> list[CaseResult]:
    """A small random-init HF causal LM (``hf_configs.make_model(arch)``) compiled for ``target``
    and for ``reference`` with the same compression options: the prefill of ``seq`` tokens and
    one decode step on the reference's cache, then the same after save and ``bitsmith.load``."""
    import bitsmith
    from ..runtime.generate import empty_cache, positions
    from .hf_configs import VOCAB, make_model

    plain, compression = split_options(options)
    backend = backend_for_target(target)
    tolerance = backend.tolerance(target, resolved_options(backend, target, plain))
    model = make_model(arch)
    compiled = bitsmith.compile(model, target, **plain, **compression)
    reference = bitsmith.compile(model, "reference", **compression)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
    prefill = [ids, positions(batch, 0, seq), *empty_cache(reference.module, batch)]
    want = reference.run("main", prefill)
    step = [rng.integers(0, VOCAB, (batch, 1)).astype(np.int64), positions(batch, seq, 1), *want[1:]]
    want_step = reference.run("main", step)
    results = []
    with tempfile.TemporaryDirectory(prefix="bitsmith-conformance-") as where:
        compiled.save(where)
        loaded = bitsmith.load(where)
        for how, cm in (("compiled", compiled), ("saved and loaded", loaded)):
            results.append(_compare(f"{arch} prefill ({how})", target, tolerance, cm.run("main", prefill), want))
            results.append(_compare(f"{arch} decode step ({how})", target, tolerance, cm.run("main", step), want_step))
    return results


def backend_conformance(target: str, options: Mapping[str, Any] | None = None, *,
                        examples: int = RANDOM_EXAMPLES, archs: Sequence[str] = HF_ARCHS) -> ConformanceReport:
    """Runs the whole suite on ``target``; raises ConformanceError on the first disagreement.

    ``options``: compile options of the target (and compression options such as
    ``quant="bitmod-w4"``, which apply to the HF models only). ``examples``: how many random
    modules; ``archs``: which ``hf_configs`` families (``()`` skips them, and the need for the
    ``frontend`` extra)."""
    backend = backend_for_target(target)
    plain, _ = split_options(options)
    cases, skipped = check_random_modules(target, plain, examples=examples) if examples else ([], 0)
    for arch in archs:
        cases.extend(check_hf_model(target, arch, options))
    return ConformanceReport(target, backend.tolerance(target, resolved_options(backend, target, plain)),
                             tuple(cases), skipped)
