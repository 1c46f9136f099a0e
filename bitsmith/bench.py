"""``bitsmith bench``: prefill and decode speed of a saved artifact, in llama-bench's shape.

The one measuring tool other benchmarks call (``run_bench`` returns a ``BenchResult``). Per
repetition, after one untimed warm-up: one prefill of ``prompt_tokens`` synthetic token ids
(drawn from a seeded RNG over the vocabulary, as llama-bench does, so no tokenizer or text is
involved), then ``gen_tokens`` greedy decode steps on its KV cache. Reported as mean ± sample
stddev over the repetitions: prefill tokens/s (pp), decode tokens/s (tg), time to first token
(prefill call + argmax of its last logits). Peak RSS is the process's high-water mark after
loading and every run (``resource.getrusage``; psutil is not a dependency), so it includes
loading. Uses the runtime only (never the frontend or passes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np



@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of per-repetition values."""

    mean: float
    std: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, tuple(values))


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int  # os.cpu_count()
    cores_usable: int  # CPUs this process may run on (its affinity mask)
    native: tuple[str, ...]  # what the artifact's native code was built for, one line per kind


@dataclass(frozen=True)
class BenchResult:
    path: str
    model: str
    target: str
    backend: str
    size_bytes: int  # stored tensor bytes (weights, codes, scales, ...)
    params: int  # source-model weights: a quantized layer counts in_features * out_features
    threads: int | None  # requested; None = the artifact's own setting
    threads_effective: int | None  # the TVM pool's size after the runs, where the target has one
    prompt_tokens: int
    gen_tokens: int
    repetitions: int
    seed: int
    prefill_seconds: Stat
    decode_seconds: Stat
    prefill_tokens_per_second: Stat  # per repetition: prompt_tokens / prefill seconds
    decode_tokens_per_second: Stat  # per repetition: gen_tokens / decode seconds
    time_to_first_token_seconds: Stat
    peak_rss_bytes: int | None  # None where the platform has no getrusage
    machine: Machine

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_request(manifest: dict[str, Any], prompt_tokens: int, gen_tokens: int, repetitions: int,
                  threads: int | None) -> None:
    """Raises ValueError for counts that cannot run on this artifact (before anything loads)."""
    for name, value in (("prompt tokens", prompt_tokens), ("gen tokens", gen_tokens),
                        ("repetitions", repetitions)):
        _positive(name, value)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be a non-negative integer (0: every CPU), got {threads!r}")
    attrs = manifest["module_attrs"]
    if attrs.get("kind") != "causal_lm":
        raise ValueError(f"the artifact holds no causal language model (module kind {attrs.get('kind')!r}); "
                         "`bitsmith bench` measures language models only")
    limit = attrs.get("max_positions")
    if isinstance(limit, int) and prompt_tokens + gen_tokens > limit:
        raise ValueError(f"prompt tokens ({prompt_tokens}) + gen tokens ({gen_tokens}) exceed the model's "
                         f"context of {limit} positions")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(manifest: dict[str, Any], usable_cores: int) -> Machine:
    from .runtime import trust
    built = sorted({f"{f.spec.kind} for {f.spec.arch} {f.spec.cpu}" for f in trust.native_files(manifest)})
    return Machine(_cpu_model(), os.cpu_count() or 1, usable_cores, tuple(built))


def parameter_count(module: Any) -> int:
    """Stored tensor elements, each quantized layer's storage replaced by its in*out weights."""
    tensors = module.tensors
    total = sum(tensors[n].size for n in tensors)
    replaced: set[str] = set()
    for fn in module.functions:
        named = {n.outputs[0].name: n.attr("name") for n in fn.nodes if n.op == "constant"}
        for node in (n for n in fn.nodes if n.op == "qlinear"):
            storage = node.inputs[1:len(node.inputs) - (1 if node.attr("bias") else 0)]
            names = {named[v] for v in storage if v in named} - replaced
            total += node.attr("in_features") * node.attr("out_features") - sum(tensors[n].size for n in names)
            replaced |= names
    return int(total)


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _load(path: str, threads: int | None, trust_native_code: bool) -> Any:
    """``threads`` go through ``bitsmith.load`` (None: the artifact's own setting); the
    reference target refuses a thread count, as load says."""
    import bitsmith
    if threads is None:
        return bitsmith.load(path, trust_native_code=trust_native_code)
    return bitsmith.load(path, trust_native_code=trust_native_code, threads=threads)


def _pool_threads(report: dict[str, Any]) -> int | None:
    """The TVM pool size the runs used: the tvm-llvm report's, or, for a target whose host code
    runs on TVM's pool (lut-cpu), the calling thread's pool; None where no TVM pool runs."""
    if isinstance(report.get("threads_effective"), int):
        return int(report["threads_effective"])
    if report.get("engine_threads") == "TVM thread pool":
        from .backends.tvm import runtime_cpu
        return runtime_cpu.num_threads()
    return None


def _one_run(cm: Any, prompt: np.ndarray, gen_tokens: int) -> tuple[float, float, float]:
    """(prefill seconds, time to first token, decode seconds) of one prefill + greedy decode."""
    from .runtime.generate import empty_cache, positions
    t0 = time.perf_counter()
    cache = empty_cache(cm.module, 1)
    p0 = time.perf_counter()
    logits, *cache = cm.run("main", [prompt, positions(1, 0, prompt.shape[1]), *cache])
    p1 = time.perf_counter()
    token = int(logits[0, -1].argmax())
    t1 = time.perf_counter()
    start = prompt.shape[1]
    for _ in range(gen_tokens):
        step = np.asarray([[token]], dtype=np.int64)
        logits, *cache = cm.run("main", [step, positions(1, start, 1), *cache])
        token = int(logits[0, -1].argmax())
        start += 1
    t2 = time.perf_counter()
    return p1 - p0, t1 - t0, t2 - t1


def run_bench(path: str, prompt_tokens: int = 512, gen_tokens: int = 128, repetitions: int = 3,
              threads: int | None = None, seed: int = 0, trust_native_code: bool = False) -> BenchResult:
    """Measures the artifact at ``path`` (see the module docstring for what and how)."""
    from .runtime.manifest import read_manifest, tensor_bytes
    usable = _usable_cores()  # before any run: TVM's pool pins the calling thread to one CPU
    manifest = read_manifest(path)
    check_request(manifest, prompt_tokens, gen_tokens, repetitions, threads)
    cm = _load(path, threads, trust_native_code)
    vocab = int(cm.module.attr("vocab_size"))
    prompt = np.random.default_rng(seed).integers(0, vocab, size=(1, prompt_tokens), dtype=np.int64)
    _one_run(cm, prompt, gen_tokens)  # warm-up: first-call costs (allocation, pools) stay out
    runs = [_one_run(cm, prompt, gen_tokens) for _ in range(repetitions)]
    pre, ttft, dec = ([r[i] for r in runs] for i in range(3))
    effective = _pool_threads(cm.executable.report())
    attrs = manifest["module_attrs"]
    return BenchResult(
        path=str(path), model=str(attrs.get("model_name") or os.path.basename(os.path.normpath(path))),
        target=manifest["target"], backend=manifest["backend"], size_bytes=tensor_bytes(manifest),
        params=parameter_count(cm.module), threads=threads,
        threads_effective=effective,
        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repetitions=repetitions, seed=seed,
        prefill_seconds=Stat.of(pre), decode_seconds=Stat.of(dec),
        prefill_tokens_per_second=Stat.of([prompt_tokens / s for s in pre]),
        decode_tokens_per_second=Stat.of([gen_tokens / s for s in dec]),
        time_to_first_token_seconds=Stat.of(ttft), peak_rss_bytes=peak_rss_bytes(),
        machine=machine(manifest, usable))


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _threads_cell(r: BenchResult) -> str:
    if r.threads_effective is not None:
        return str(r.threads_effective)
    return str(r.threads) if r.threads is not None else f"{r.machine.cores_usable} (all)"


def markdown(r: BenchResult) -> str:
    """llama-bench's table (one row per test) with the machine and the other measures under it."""
    head = ["model", "size", "params", "target", "threads", "test", "t/s"]
    common = [r.model, _size(r.size_bytes), _params(r.params), r.target, _threads_cell(r)]
    rows = [common + [f"pp{r.prompt_tokens}", _pm(r.prefill_tokens_per_second, 1.0)],
            common + [f"tg{r.gen_tokens}", _pm(r.decode_tokens_per_second, 1.0)]]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    m = r.machine
    rss = "n/a" if r.peak_rss_bytes is None else _size(r.peak_rss_bytes)
    lines += [
        "",
        f"time to first token (pp{r.prompt_tokens}): {_pm(r.time_to_first_token_seconds, 1e3)} ms; "
        f"peak RSS {rss} (process, loading included); {r.repetitions} repetitions after 1 warm-up, seed {r.seed}",
        f"machine: {m.cpu}, {m.cores} cores ({m.cores_usable} usable); native code: "
        + ("; ".join(m.native) if m.native else "none (pure Python/numpy)"),
    ]
    return "\n".join(lines)


def _pm(s: Stat, scale: float) -> str:
    return f"{s.mean * scale:.2f} ± {s.std * scale:.2f}"


def cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(args.artifact, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                       repetitions=args.repetitions, threads=args.threads, seed=args.seed,
                       trust_native_code=args.trust_native_code)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(markdown(result))
    if args.threads is not None and result.threads_effective not in (None, args.threads):
        print(f"bitsmith: warning: asked for {args.threads} threads, the TVM pool has {result.threads_effective}",
              file=sys.stderr)
    return 0


def add_bench_command(sub: Any) -> None:
    """Registers ``bitsmith bench`` on the command line's subparsers."""
    p = sub.add_parser("bench", help="prefill/decode tokens per second, time to first token and peak RSS "
                                     "of an artifact (llama-bench's table)")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=int, default=128, metavar="N", help="greedy decode steps (default 128)")
    p.add_argument("--repetitions", type=int, default=3, metavar="N", help="timed runs after one warm-up (default 3)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads, 0 = every CPU, as on run/chat (default: the artifact's setting)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompt's token ids (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-native-code", action="store_true",
                   help="load native libraries this machine did not build or trust (see `bitsmith trust`)")
    p.set_defaults(func=cmd_bench)
