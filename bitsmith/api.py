"""``bitsmith.compile`` and ``bitsmith.load``: the user-facing entry points."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .backends import backend_for_target
from .backends.base import Pipeline, check_legal
from .compression import CompressionOptions
from .errors import PluginError, UnknownOptionError
from .runtime import CompiledModel, LanguageModelInfo

# Target-neutral cleanup run before a backend's own pipeline.
DEFAULT_PIPELINE: tuple[str, ...] = ("dce", "cse", "fold", "dce")


@dataclass(frozen=True)
class CompileConfig:
    """Everything ``compile`` takes besides the model, as one reusable value."""

    target: str = "reference"
    passes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    dump_ir: str | None = None
    print_after: str | None = None


def _pass_specs(passes: str | Sequence[str] | None) -> list[str]:
    if passes is None:
        return []
    return [passes] if isinstance(passes, str) else list(passes)


def compile(model: Any, target: str | None = None, *, config: CompileConfig | None = None,
            example_inputs: tuple | None = None, passes: str | Sequence[str] | None = None,
            dump_ir: str | None = None, print_after: str | None = None,
            progress: Callable[[str], None] | None = None, tokenizer: Any = None,
            **options: Any) -> CompiledModel:
    """Compiles ``model`` (nn.Module, model name or path) for ``target``.

    ``passes`` adds pass specs (e.g. ``"cse,dce"`` or ``"fold{max_elements=64}"``) after the
    default cleanup and compression, before the backend's pipeline (legalize, lower,
    finalize; see ``backends.base.Pipeline``), whose result must hold only ops the target
    accepts (else UnsupportedOpError); ``dump_ir`` writes the IR after every pass
    to a folder; ``print_after`` ("all" or pass names, comma separated) prints it to stderr.
    Backend-specific ``options`` are checked against what the target declares;
    ``progress`` receives a line at the start of each step that can take seconds.
    Compression options (see ``CompressionOptions``): ``quant`` (a scheme such as
    "bitmod-w3"), ``group_size``, ``outliers``, ``sparsity`` ("2:4"), ``sparsity_method``,
    ``calibrate`` with ``calib_text``, ``layers`` (globs over module paths). With
    ``offload_attention=True`` (and optionally ``attention_target=``) the cached decode ``main``
    is split into a dense and an attention program, each built for its target, and an
    ``OffloadedModel`` comes back (docs/attention-offload.md). ``tokenizer``
    supplies one when an nn.Module is compiled and calibration or generation needs it.
    """
    from .frontend import capture
    from .passes import DumpToFolder, PassManager, PrintAfter, parse_pass_spec

    config = config or CompileConfig()
    target = target or config.target
    options = {**config.options, **options}
    specs = list(config.passes) + _pass_specs(passes)
    dump_ir = dump_ir or config.dump_ir
    print_after = print_after or config.print_after

    backend = backend_for_target(target)  # unknown targets fail before the slow capture
    options = dict(options)
    from .offload_compile import pop_offload_options
    offload, attention_target = pop_offload_options(options)
    compression = CompressionOptions.from_options(options)
    compression.check_model(model)
    defaults = backend.option_defaults(target)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise UnknownOptionError(f"option for target {target!r}", unknown[0],
                                 list(defaults) + list(CompressionOptions.names()))
    resolved = {**defaults, **options}
    def parsed(spec_list: Sequence[str]) -> list[Any]:
        return [p for spec in spec_list for p in parse_pass_spec(spec)]

    cleanup = parsed(DEFAULT_PIPELINE)  # parsed now so a bad spec fails before the capture
    user = parsed(specs)
    phases = backend_pipeline(backend, target, resolved)
    lowering = [] if offload else parsed(phases.specs())  # offloaded: each side gets its own

    say = progress or (lambda message: None)
    t0 = time.perf_counter()
    captured = capture(model, example_inputs, progress=say)
    if tokenizer is not None and captured.tokenizer_json is None:
        captured = _with_tokenizer(captured, tokenizer)
    # the frontend's own passes (a causal LM's KV cache) come first; compression passes need
    # the captured tokenizer (calibration), so they join only now; the backend's phases come
    # last, so that what its legality check sees is what ``build`` gets
    compressing = compression.build_passes(captured.tokenizer_json, captured.source_weights)
    pipeline = parsed(captured.passes) + cleanup + compressing + user + lowering
    t1 = time.perf_counter()
    instruments: list[Any] = []
    if dump_ir:
        instruments.append(DumpToFolder(dump_ir))
    if print_after:
        names = "all" if print_after == "all" else tuple(print_after.split(","))
        instruments.append(PrintAfter(names))
    say(f"running passes: {', '.join(p.name for p in pipeline)}")
    # BITSMITH_VERIFY_PASSES=each verifies after every pass; by default only the ends are (a
    # broken module is traced to its pass by a verified rerun, see PassManager)
    manager = PassManager(pipeline, instruments, verify=os.environ.get("BITSMITH_VERIFY_PASSES", "ends"))
    module = manager.run(captured.module)
    if offload:
        from .offload_compile import build_offloaded
        lm = LanguageModelInfo(captured.tokenizer_json, captured.bos_token_id, captured.eos_token_id,
                               captured.chat_template)
        return build_offloaded(module, target, {**resolved, **compression.as_json()}, attention_target, lm,
                               {"pipeline": [p.name for p in pipeline]}, say)
    check_legal(module, backend.legal_ops(target, resolved), target)
    t2 = time.perf_counter()
    say(f"building for target {target} (backend {backend.name})")
    executable = backend.build(module, target, resolved)
    t3 = time.perf_counter()

    pass_seconds: dict[str, float] = {}
    for name, seconds in manager.timings:  # a pass that runs twice (dce) adds up
        pass_seconds[name] = pass_seconds.get(name, 0.0) + seconds
    # what was compiled goes into an artifact; how long it took stays in memory (timings
    # differ run to run, and artifacts are byte-identical across compiles of the same input)
    info = {"pipeline": [p.name for p in pipeline]}
    timings = {"seconds": {**captured.seconds, "capture": t1 - t0, "passes": t2 - t1, "build": t3 - t2},
               "pass_seconds": pass_seconds}
    lm = None
    if module.attr("kind") == "causal_lm":
        lm = LanguageModelInfo(captured.tokenizer_json, captured.bos_token_id, captured.eos_token_id,
                               captured.chat_template)
    return CompiledModel(module, executable, target, {**resolved, **compression.as_json()}, lm, info, timings)


def backend_pipeline(backend: Any, target: str, options: dict[str, Any]) -> Pipeline:
    """The backend's phased Pipeline for ``target``, type-checked (a plugin's mistake is named)."""
    phases = backend.pipeline(target, options)
    if not isinstance(phases, Pipeline) or not all(
            isinstance(s, str) for phase in (phases.legalize, phases.lower, phases.finalize) for s in phase):
        raise PluginError(f"backend {backend.name!r}: pipeline({target!r}) must return a "
                          f"bitsmith.backends.base.Pipeline of pass-spec strings, got {phases!r}"[:300])
    return phases


def _with_tokenizer(captured: Any, tokenizer: Any) -> Any:
    import dataclasses
    if isinstance(tokenizer, str):
        text = tokenizer
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
        text = backend.to_str()
    bos = captured.bos_token_id if captured.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    eos = captured.eos_token_id if captured.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    template = captured.chat_template
    if template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        template = tokenizer.chat_template
    return dataclasses.replace(captured, tokenizer_json=text, bos_token_id=bos, eos_token_id=eos,
                               chat_template=template)


def load(path: str, trust_native_code: bool = False, threads: int | None = None) -> CompiledModel:
    """Loads a saved artifact; validates every file before running anything from it.

    Native code in it (kernel libraries, the LUT engine) loads only if this machine built it
    (its digests are in the local trust store, see ``bitsmith trust``) or if
    ``trust_native_code=True``; otherwise ``UntrustedNativeCodeError`` says which files and how
    to trust them. Pass True only for artifacts from a source you would let run code.

    ``threads`` sets the CPU kernel thread count of targets that have one (tvm-llvm, lut-cpu;
    0: every core the process may use), replacing the one stored at compile time; the reference
    target refuses it (ValueError). An artifact compiled with ``offload_attention=True`` loads
    with both programs in this process (``runtime.offload.launch.load_offloaded`` for workers)."""
    from .runtime.artifact import load_artifact
    from .runtime.offload.artifact import is_offload_artifact
    if is_offload_artifact(path):
        from .runtime.offload.launch import load_offloaded
        return load_offloaded(str(path), trust_native_code=trust_native_code, threads=threads)
    return load_artifact(path, trust_native_code=trust_native_code, threads=threads)
