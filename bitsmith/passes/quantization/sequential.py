"""Sequential calibration, GPTQ's order: each layer's statistics come from the outputs of the
already-quantized layers before it (Frantar et al. 2023, Sec. 4 / their ``--true-sequential``).

The stages are the distinct values feeding the layers to quantize, in the order ``main``
computes them; layers that share an input (q/k/v, gate/up) share a stage, so within a decoder
block the order is qkv -> o -> gate/up -> down ("true sequential"). ``main`` is cut into
segments: segment k computes, from the values earlier segments left behind, every node up to
the producer of stage value ``v_k`` that later stages need. After segment k, ``step`` quantizes
the layers fed by ``v_k``, so segment k+1 runs them quantized. Every node runs once per
window: the cost is one forward pass, plus one runner build per segment. Source nodes without
inputs (constants, scalars) are re-made in every segment that uses them instead of carried.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bitsmith.ir import Module
from bitsmith.ir.graph import Function, Node, Value

from .calibration import CalibrationRunner, LayerStats, GramAccumulator, main_arguments

StepFn = Callable[[Module, str, LayerStats], Module]


@dataclass(frozen=True)
class Segment:
    """``module``'s main takes ``params`` (values earlier segments computed, or main's own
    parameters) and returns ``results``: the stage value first, then what later stages need."""

    module: Module
    params: tuple[str, ...]
    results: tuple[str, ...]
    computed: frozenset[str]


def stage_order(module: Module, values: Sequence[str]) -> list[str]:
    """``values`` (distinct) in the order main's nodes produce them."""
    fn = module.function("main")
    index = {o.name: i for i, n in enumerate(fn.nodes) for o in n.outputs}
    missing = sorted(set(values) - set(index))
    if missing:
        raise ValueError(f"sequential calibration: {missing} are not computed by main (parameters or unknown); "
                         "only computed values are observed")
    return sorted(dict.fromkeys(values), key=index.__getitem__)


def _ancestors(fn: Function, targets: Sequence[str]) -> set[str]:
    producers = fn.producers()
    need: set[str] = set()
    stack = list(targets)
    while stack:
        v = stack.pop()
        if v in need:
            continue
        need.add(v)
        node = producers.get(v)
        if node is not None:
            stack.extend(node.inputs)
    return need


def _is_source(node: Node) -> bool:
    return not node.inputs


def cut_segment(module: Module, done: set[str], stages_left: Sequence[str]) -> Segment:
    """The segment computing ``stages_left[0]`` from ``done`` values (see the module docstring)."""
    fn = module.function("main")
    target = stages_left[0]
    needed = _ancestors(fn, stages_left)
    pending = [n for n in fn.nodes if not _is_source(n) and any(o.name in needed for o in n.outputs)
               and not all(o.name in done for o in n.outputs)]
    pos = next(i for i, n in enumerate(pending) if any(o.name == target for o in n.outputs))
    nodes, later = pending[:pos + 1], pending[pos + 1:]
    made = {o.name for n in nodes for o in n.outputs}
    producers = fn.producers()
    sources: dict[str, Node] = {}
    params: list[str] = []
    for n in nodes:
        for v in n.inputs:
            if v in made:
                continue
            p = producers.get(v)
            if p is not None and _is_source(p):
                sources[v] = p
            elif v not in params:
                if v not in done:
                    raise ValueError(f"sequential calibration: %{v} is needed before it is computed")
                params.append(v)
    later_inputs = {v for n in later for v in n.inputs}
    results = [target] + [v for v in sorted(made) if v in later_inputs and v != target]
    types = fn.value_types()
    order = {id(n): i for i, n in enumerate(fn.nodes)}
    seg_nodes = sorted(sources.values(), key=lambda n: order[id(n)]) + nodes
    seg_fn = Function("main", tuple(Value(v, types[v]) for v in params), tuple(seg_nodes), tuple(results))
    seg_module = module.replace(functions=(seg_fn,)).prune_tensors()
    return Segment(seg_module, tuple(params), tuple(results), frozenset(made))


def run_sequential(module: Module, windows: Sequence[np.ndarray], stages: Sequence[str], step: StepFn,
                   runner: CalibrationRunner, progress: bool = False) -> Module:
    """Runs the stages of ``module`` in order over the calibration ``windows`` (int64 [1, L]
    token ids) with ``runner``; after each stage, ``step(module, value, stats)`` returns the
    module with that stage's layers quantized. Returns the last module ``step`` returned.

    ``step`` must leave every node that produces an earlier stage value or what it depends on
    as it was (a weight pass rewrites only the layers fed by ``value``)."""
    if not windows:
        raise ValueError("no calibration windows")
    order = stage_order(module, stages)
    main = module.function("main")
    carried = [dict(zip((p.name for p in main.params), main_arguments(module, ids))) for ids in windows]
    done = {p.name for p in main.params}
    start = last_report = time.perf_counter()
    for k, value in enumerate(order):
        seg = cut_segment(module, done, order[k:])
        run = runner.compile(seg.module)
        acc = GramAccumulator({value: seg.module.function("main").result_types()[0].shape[-1]})
        for env in carried:
            env.update(zip(seg.results, run([env[p] for p in seg.params])))
            acc.add(value, env[value])  # as collect_statistics: float32 Gram per window, float64 across
        done |= seg.computed
        module = step(module, value, acc.stats()[value])
        fn = module.function("main")
        needed = _ancestors(fn, order[k + 1:])
        live = {v for n in fn.nodes if any(o.name in needed for o in n.outputs)
                and not all(o.name in done for o in n.outputs) for v in n.inputs}
        for env in carried:
            for name in [n for n in env if n not in live]:
                del env[name]
        now = time.perf_counter()
        if progress and (now - last_report >= 10 or k + 1 == len(order)):
            print(f"calibration: stage {k + 1}/{len(order)}, {now - start:.0f}s", file=sys.stderr, flush=True)
            last_report = now
    return module
