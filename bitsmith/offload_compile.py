"""Compiling with ``offload_attention=True``: the cached decode ``main`` split by the pass of
that name, then each side built by its own target's backend (docs/attention-offload.md)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .backends import backend_for_target
from .backends.base import check_legal
from .ir import Module
from .passes import PassManager, parse_pass_spec
from .passes.drop_attention_mask import DropAttentionMask
from .passes.kv_head_group import KVHeadGroup
from .passes.offload_attention import ATTENTION_DEVICE, DENSE, OffloadAttention, attention_roles, offload_report
from .runtime.model import CompiledModel, LanguageModelInfo
from .runtime.offload.model import OffloadedModel, assemble
from .runtime.offload.schedule import AttentionStep, DenseStep, Schedule, TypeSpec


def schedule_of(module: Module, function: str = "main") -> Schedule:
    """The schedule ``offload_attention`` left in ``function`` as runtime data."""
    fn = module.function(function)
    types = fn.value_types()
    steps = []
    for node in fn.nodes:
        callee = module.function(node.attr("callee"))
        outputs = tuple(o.name for o in node.outputs)
        if callee.attr("device") == DENSE:
            steps.append(DenseStep(callee.name, node.inputs, outputs))
            continue
        roles, result_state = attention_roles(callee, {v for v in node.inputs if v in {p.name for p in fn.params}})
        spec = [TypeSpec(types[v].shape, types[v].dtype) for v in node.inputs]
        kv = next(t.shape[1] for t, r in zip(spec, roles) if r in ("kv", "state"))
        q = next(t.shape[1] for t, r in zip(spec, roles) if r == "q")
        steps.append(AttentionStep(callee.name, int(callee.attr("layer")), node.inputs, outputs, roles, result_state,
                                   tuple(spec), tuple(TypeSpec(o.type.shape, o.type.dtype) for o in node.outputs),
                                   int(q), int(kv), callee.attr("send_bytes"), callee.attr("recv_bytes")))
    return Schedule(fn.name, tuple(p.name for p in fn.params), fn.results, tuple(steps))


def _side(module: Module, device: str, attrs: Mapping[str, Any]) -> Module:
    functions = tuple(f for f in module.functions if f.attr("device") == device and f.attr("partition") == "offload_attention")
    return module.replace(functions=functions, attrs=dict(attrs)).prune_tensors()


def _build(module: Module, target: str, options: dict[str, Any], lm: LanguageModelInfo | None,
           info: dict[str, Any], say: Callable[[str], None]) -> CompiledModel:
    from .api import backend_pipeline
    backend = backend_for_target(target)
    phases = backend_pipeline(backend, target, options)
    passes = [p for spec in phases.specs() for p in parse_pass_spec(spec)]
    say(f"building the {module.attr('offload_side')} program for target {target} (backend {backend.name})")
    module = PassManager(passes).run(module)
    check_legal(module, backend.legal_ops(target, options), target)
    own = backend.option_defaults(target)  # compression options are recorded, not handed to the backend
    executable = backend.build(module, target, {k: v for k, v in options.items() if k in own})
    return CompiledModel(module, executable, target, options, lm,
                         {**info, "pipeline": info.get("pipeline", []) + [p.name for p in passes]})


def transfer_report(module: Module) -> dict[str, Any]:
    """Bytes per decode token (batch 1) crossing the cut, per layer and in total."""
    r = offload_report(module, {"batch": 1, "seq": 1})
    return {"per_layer": [{"layer": x.layer, "sent": x.sent, "received": x.received} for x in r.layers],
            "sent": r.sent, "received": r.received}


def build_offloaded(module: Module, target: str, options: dict[str, Any], attention_target: str | None,
                    lm: LanguageModelInfo | None, info: dict[str, Any],
                    say: Callable[[str], None]) -> OffloadedModel:
    """Splits the cached ``module`` and builds the dense side for ``target`` (with ``options``) and
    the attention side for ``attention_target`` (default: the same target; its own default options)."""
    attention_target = attention_target or target
    attention_backend = backend_for_target(attention_target)
    attention_options = dict(options) if attention_target == target else attention_backend.option_defaults(attention_target)
    # an offloaded run feeds equal-length batches (one batch at a time): without main's
    # attention_mask the runtime refuses a ragged batch clearly, and no mask crosses the link
    say("running passes: drop-attention-mask, offload_attention, kv_head_group")
    split = PassManager([DropAttentionMask(), OffloadAttention()]).run(module)
    schedule = schedule_of(split)
    dense = _side(split, DENSE, {**dict(module.attrs), "offload_side": "dense"})
    attention = PassManager([KVHeadGroup()]).run(
        _side(split, ATTENTION_DEVICE, {"kind": "attention_program", "offload_side": "attention"}))
    info = {**info, "pipeline": info.get("pipeline", []) + ["offload_attention"]}
    dense_cm = _build(dense, target, options, lm, info, say)
    attention_cm = _build(attention, attention_target, attention_options, None, info, say)
    return assemble(dense_cm, attention_cm, schedule, None, False, transfer_report(split), attention_target)


def pop_offload_options(options: dict[str, Any]) -> tuple[bool, str | None]:
    """Removes ``offload_attention`` / ``attention_target`` from compile options."""
    offload = options.pop("offload_attention", False)
    attention_target = options.pop("attention_target", None)
    if not isinstance(offload, bool):
        raise ValueError(f"offload_attention must be True or False, got {offload!r}")
    if attention_target is not None and not offload:
        raise ValueError("attention_target= needs offload_attention=True")
    if attention_target is not None:
        backend_for_target(attention_target)  # an unknown target fails before the capture
    return offload, attention_target
