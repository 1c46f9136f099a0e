"""Calibration statistics: the input activations of every linear layer on real text.

GPTQ (Frantar et al., ICLR 2023) needs each layer's Hessian of the output error,
``H = 2 XᵀX`` over the calibration tokens ``X`` [tokens, K]; activation-aware N:M selection
(Wanda, Sun et al., ICLR 2024) needs each input column's norm ``‖X[:, k]‖₂``. Both come from one
pass of the reference interpreter over calibration windows, observing the value that feeds
each ``linear`` (or ``qlinear``) node.

Where the model runs: a :class:`CalibrationRunner` turns a module into a function of ``main``'s
arguments. Passes import no backend, so the API hands them the fastest CPU runner
(``bitsmith.backends.calibration``: the float32 BLAS interpreter ``numpy-fp32`` by default, or
a compiled target); the reference interpreter (:class:`InterpreterRunner`) is the oracle in tests. The runner
gets a *probe* of the module: ``main`` with the linear inputs as its only results, so nothing
after the last linear layer (lm_head, the KV outputs) is computed.

By default every layer's statistics come from one run of the full-precision model as captured
("non-sequential" GPTQ). ``bitsmith.passes.quantization.sequential`` implements the paper's
order: each layer's statistics from the already-quantized layers before it.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from bitsmith.ir import Module
from bitsmith.ir import symbolic as sym
from bitsmith.ir.interpreter import run_function
from bitsmith.ir.traits import LINEAR_LIKE, has_trait
from bitsmith.ir.types import numpy_dtype


@dataclass(frozen=True)
class LayerStats:
    """Second-moment statistics of one linear layer input over the calibration tokens."""

    hessian: np.ndarray  # float64 [K, K]: XᵀX / tokens (GPTQ's 2XᵀX up to a positive factor,
    #                      which GPTQ's result does not depend on)
    column_norms: np.ndarray  # float64 [K]: ‖X[:, k]‖₂ over all calibration tokens
    tokens: int


RunFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


class CalibrationRunner(Protocol):
    """Runs modules for calibration. ``compile(module)`` returns a function from the arguments
    of the module's ``main`` (numpy arrays) to its results. The module is a probe (its results
    are activations, see :func:`probe_module`) or a segment of one (``sequential``)."""

    name: str

    def compile(self, module: Module) -> RunFn: ...


class InterpreterRunner:
    """The reference interpreter as a runner: no build step, float64 accumulation."""

    name = "reference"

    def compile(self, module: Module) -> RunFn:
        return lambda args: run_function(module, "main", args)

    def __repr__(self) -> str:
        return "InterpreterRunner()"


def probe_module(module: Module, values: Sequence[str]) -> Module:
    """``module`` with ``main`` returning ``values`` (in that order) and nothing else, dead code
    (what only the old results needed) removed."""
    from ..dce import drop_dead
    fn = module.function("main")
    params = {p.name for p in fn.params}
    bad = sorted(set(values) & params)
    if bad:  # a runner returns computed values; a parameter feeding a linear is never one
        raise ValueError(f"linear inputs {bad} are parameters of main; only computed values are observed")
    return drop_dead(module.with_function(fn.replace(results=tuple(values))))


def linear_inputs(module: Module, function: str = "main") -> dict[str, int]:
    """The values that feed a linear-like node (linear, qlinear) of ``function``, with their
    feature size."""
    fn = module.function(function)
    types = fn.value_types()
    out: dict[str, int] = {}
    for node in fn.nodes:
        if has_trait(node.op, LINEAR_LIKE):
            k = types[node.inputs[0]].shape[-1]
            if not isinstance(k, int):
                raise ValueError(f"{node.op} input %{node.inputs[0]} has symbolic features {k}")
            out[node.inputs[0]] = k
    return out


def _empty_caches(module: Module, batch: int, seq: int) -> list[np.ndarray]:
    """Zero-length past key/value arrays for ``main``'s parameters after (input_ids, position_ids),
    as bitsmith.runtime.generate.empty_cache makes them (passes do not import the runtime), and
    an all-ones attention_mask where ``main`` takes one (kv-cache pass)."""
    out = []
    for p in module.function("main").params[2:]:
        shape = tuple(sym.evaluate(d, {"batch": batch, "past": 0, "seq": seq}) for d in p.type.shape)
        fill = np.ones if p.name == "attention_mask" else np.zeros
        out.append(fill(shape, dtype=numpy_dtype(p.type.dtype)))
    return out


class GramAccumulator:
    """Sums XᵀX per observed value: a float32 Gram (BLAS syrk) per window, summed in float64."""

    def __init__(self, wanted: dict[str, int]) -> None:
        self.wanted = wanted
        self.sums = {name: np.zeros((k, k), dtype=np.float64) for name, k in wanted.items()}
        self.tokens = dict.fromkeys(wanted, 0)

    def add(self, name: str, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1, self.wanted[name])
        x32 = x.astype(np.float32, copy=False)
        # float32 products of one window (a few hundred tokens, relative error ~1e-6), summed
        # across windows in float64
        self.sums[name] += (x32.T @ x32).astype(np.float64)
        self.tokens[name] += x.shape[0]

    def stats(self) -> dict[str, LayerStats]:
        out = {}
        for name, total in self.sums.items():
            n = self.tokens[name]
            if n == 0:
                raise ValueError(f"linear input %{name} was never computed on the calibration windows")
            out[name] = layer_stats(total, n)
        return out


def layer_stats(gram: np.ndarray, tokens: int) -> LayerStats:
    """LayerStats from Σ xᵀx (float64 [K, K]) over ``tokens`` rows, read-only (shared by every pass
    that asks, see TextCalibration)."""
    hessian, norms = gram / tokens, np.sqrt(np.diag(gram))
    hessian.setflags(write=False)
    norms.setflags(write=False)
    return LayerStats(hessian=hessian, column_norms=norms, tokens=tokens)


def main_arguments(module: Module, ids: np.ndarray) -> list[np.ndarray]:
    """The arguments of a causal-LM ``main`` for one window of token ids (int64 [B, L] or [L]):
    the ids, positions 0..L-1 and empty caches."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    b, length = ids.shape
    positions = np.broadcast_to(np.arange(length, dtype=np.int64), (b, length)).copy()
    return [ids, positions, *_empty_caches(module, b, length)]


def collect_statistics(module: Module, windows: list[np.ndarray], progress: bool = False,
                       runner: CalibrationRunner | None = None) -> dict[str, LayerStats]:
    """Runs the causal-LM ``main`` of ``module`` on each window (int64 [1, L] token ids, positions
    0..L-1, empty caches) with ``runner`` (default: the reference interpreter) and returns the
    statistics of every linear layer input, keyed by the name of the value feeding the layer
    (q/k/v projections that share an input share one entry).
    """
    if not windows:
        raise ValueError("no calibration windows")
    wanted = linear_inputs(module)
    acc = GramAccumulator(wanted)
    names = list(wanted)
    run = (runner or InterpreterRunner()).compile(probe_module(module, names))
    start = last_report = time.perf_counter()
    for i, ids in enumerate(windows):
        for name, array in zip(names, run(main_arguments(module, ids))):
            acc.add(name, array)
        now = time.perf_counter()
        if progress and (now - last_report >= 10 or i + 1 == len(windows)):  # a window of SmolLM2: ~10 s
            print(f"calibration: {i + 1}/{len(windows)} windows, {now - start:.0f}s", file=sys.stderr, flush=True)
            last_report = now
    return acc.stats()


def calibration_windows(token_ids: np.ndarray, sequences: int = 64, length: int = 512) -> list[np.ndarray]:
    """The first ``sequences`` non-overlapping windows of ``length`` tokens, each int64 [1, length]
    (fewer when the text is short; a partial last window is dropped)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if sequences < 1 or length < 1:
        raise ValueError(f"need sequences >= 1 and length >= 1, got {sequences}, {length}")
    count = min(sequences, len(ids) // length)
    if count == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}")
    return [ids[i * length:(i + 1) * length][None, :].copy() for i in range(count)]


def _fingerprint(module: Module) -> tuple:
    """What calibration statistics depend on, apart from linear weights: the values feeding the
    linear layers and every constant not used as a linear layer's weight or bias. Passes that only
    rewrite linear weights (sparsify, outliers, quantize) keep it."""
    fn = module.function("main")
    constant_of = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
    other_constants: set[str] = set()
    for node in fn.nodes:
        if not has_trait(node.op, LINEAR_LIKE) and node.op != "constant":
            other_constants.update(constant_of[v] for v in node.inputs if v in constant_of)
    return (tuple(sorted(linear_inputs(module).items())),
            tuple(module.tensors.info(t) for t in sorted(other_constants)))


class TextCalibration:
    """Calibration statistics from a text file, given to passes as ``calibration=``.

    ``TextCalibration(text_path, tokenizer_json)(module)`` tokenizes the text (no special
    tokens), runs the first ``sequences`` windows of ``length`` tokens through ``module`` with
    ``runner`` (default: the reference interpreter) and returns :func:`collect_statistics`'
    result. The result is cached: a later call with a module whose fingerprint matches (same
    module, or one whose linear weights alone were rewritten, e.g. by sparsify before quantize)
    returns the first statistics, so every pass sees those of the full-precision model as
    captured (non-sequential GPTQ; see the module docstring).

    ``sequential(module, stages, step)`` is the GPTQ order instead (``sequential.run_sequential``):
    ``step(module, value, stats)`` quantizes the layers fed by ``value`` and returns the module
    whose quantized layers then produce the next stage's inputs. Nothing is cached there.
    """

    def __init__(self, text_path: str, tokenizer_json: str, sequences: int = 64, length: int = 512,
                 runner: CalibrationRunner | None = None) -> None:
        self.text_path = str(text_path)
        self.tokenizer_json = tokenizer_json
        self.sequences = sequences
        self.length = length
        self.runner = runner or InterpreterRunner()

    def __repr__(self) -> str:  # passes print their options; keep the tokenizer JSON out of it
        return (f"TextCalibration({self.text_path!r}, sequences={self.sequences}, length={self.length}, "
                f"runner={self.runner.name!r})")

    def windows(self) -> list[np.ndarray]:
        from tokenizers import Tokenizer
        text = Path(self.text_path).read_text(encoding="utf-8")
        ids = Tokenizer.from_str(self.tokenizer_json).encode(text, add_special_tokens=False).ids
        return calibration_windows(np.asarray(ids, dtype=np.int64), self.sequences, self.length)

    def _announce(self, windows: list[np.ndarray], how: str) -> None:
        print(f"calibration: {len(windows)} windows of {self.length} tokens from {self.text_path} "
              f"on {self.runner.name}{how}", file=sys.stderr, flush=True)

    def __call__(self, module: Module) -> dict[str, LayerStats]:
        text_digest = hashlib.sha256(Path(self.text_path).read_bytes()).hexdigest()
        tok_digest = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        key = (text_digest, tok_digest, self.sequences, self.length, self.runner.name, _fingerprint(module))
        for cached_key, stats in _STATS_CACHE:
            if cached_key == key:
                return stats
        windows = self.windows()
        self._announce(windows, "")
        stats = collect_statistics(module, windows, progress=True, runner=self.runner)
        _STATS_CACHE.append((key, stats))
        del _STATS_CACHE[:-_STATS_CACHE_SIZE]
        return stats

    def sequential(self, module: Module, stages: Sequence[str],
                   step: Callable[[Module, str, LayerStats], Module]) -> Module:
        from .sequential import run_sequential
        windows = self.windows()
        self._announce(windows, ", sequential")
        return run_sequential(module, windows, stages, step, self.runner, progress=True)


# Process-wide, so compiles of the same model with several schemes (a quality table) share one
# calibration run; small, since each entry holds a Hessian per distinct linear input.
_STATS_CACHE: list[tuple[tuple, dict[str, LayerStats]]] = []
_STATS_CACHE_SIZE = 2
