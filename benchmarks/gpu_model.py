"""Whole-model tvm-cuda run on one GPU: seeded SmolLM2-135M- and TinyLlama-1.1B-shaped Llamas vs torch.

Two steps, because the GPU machine has TVM's runtime but not its compiler, and receives at
most 64 MiB (a 1B model's fp16 weights are 2.2 GB):

    python benchmarks/gpu_model.py --build .gpu/prebuilt/model     # here: compile + nvcc + references
    python3 benchmarks/gpu_model.py --run .gpu/prebuilt/model --trust-native-code   # GPU machine

``--build`` compiles each model (``bitsmith.testing.seeded_llama``: weights from a seed) for
tvm-cuda and saves the artifact WITHOUT weights.safetensors (kernels, plan, manifest with
every tensor's sha256), the few tensors the seed does not make (rotary inv_freq), and the
reference target's greedy run of a seeded prompt: 32 tokens, the logits of the first
``CHECK_STEPS`` positions (teacher-forced) and, for the tolerance, the same logits from the
fp16 module on the reference interpreter (the rounding the GPU run should show).

``--run`` regenerates the weights (checked against the manifest's sha256), loads the artifact
with them (``load_artifact(weights=...)``) and reports, per model:
  * correctness: greedy tokens equal to the reference for 32 steps; logits error of the first
    steps against the fp32 reference, allowed ``TOL_FACTOR`` x the fp16 interpreter's error;
  * decode tokens/s at batch 1 and 16 (prompt 16, 128 new tokens, decode loop only, greedy):
    tvm-cuda with the step as one CUDA graph, tvm-cuda per-kernel launches, torch fp16 eager
    (transformers generate; per step = (t(128 tokens) - t(1 token)) / 127); with
    ``--compile-only``, torch.compile (generate with a static cache, mode reduce-overhead);
  * prefill of 512 tokens (ms, device-synchronized).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("smollm2-135m", "tinyllama-1.1b")
PROMPT = 16             # prompt tokens of the correctness and decode runs
GREEDY_STEPS = 32       # tokens compared with the reference
CHECK_STEPS = 4         # positions whose logits travel (prefill's last + 3 teacher-forced steps)
DECODE_TOKENS = 128     # new tokens per timed decode run
PREFILL = 512
BATCHES = (1, 16)
TOL_FACTOR = 4.0        # GPU fp16 logits error allowed: 4x the fp16 interpreter's (same roundings, other order)
PROMPT_SEED = 1234


def prompt_ids(vocab: int, batch: int, length: int) -> np.ndarray:
    """Seeded prompt tokens (raw PCG64 output: the same on any NumPy)."""
    raw = np.random.PCG64(PROMPT_SEED + batch * 1000 + length).random_raw(batch * length)
    return (raw % np.uint64(vocab)).astype(np.int64).reshape(batch, length)


# ---------------------------------------------------------------- build (TVM compiler, no GPU)

def _greedy_reference(module: Any, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """(tokens [steps], logits of the first CHECK_STEPS positions, top-2 margin of every step) of
    ``module`` on the reference interpreter."""
    from bitsmith.ir import run_function
    from bitsmith.runtime.generate import empty_cache, main_args, positions
    cache = empty_cache(module, 1)
    step_ids, start, tokens, logits_kept, margins = ids, 0, [], [], []
    for k in range(steps):
        n = step_ids.shape[1]
        logits, *cache = run_function(module, "main", main_args(module, step_ids, positions(1, start, n), cache))
        start += n
        last = np.asarray(logits[0, -1], np.float64)
        if k < CHECK_STEPS:
            logits_kept.append(last)
        top2 = np.sort(last)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tokens.append(int(np.argmax(last)))
        step_ids = np.array([[tokens[-1]]])
    return np.array(tokens, np.int64), logits_kept, margins


def _greedy_transformers(hf: Any, ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """The same as ``_greedy_reference`` from transformers' float32 model on the CPU (multithreaded
    BLAS; the interpreter would take an hour for 32 steps of a 1B model on this machine)."""
    import torch
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(ids), do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                          output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    logits = [x[0].double().numpy() for x in out.logits]
    margins = [float(np.diff(np.sort(x)[-2:])[0]) for x in logits]
    return out.sequences[0, ids.shape[1]:].numpy().astype(np.int64), logits[:CHECK_STEPS], margins


INTERPRETER_MAX_PARAMS = 300_000_000  # above: tokens from transformers, the first logits from the interpreter


def _teacher_forced(module: Any, ids: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    """Logits of the first CHECK_STEPS positions of ``module`` fed the reference tokens."""
    from bitsmith.ir import run_function
    from bitsmith.runtime.generate import empty_cache, main_args, positions
    cache = [c.astype(np.float16) for c in empty_cache(module, 1)]
    step_ids, start, out = ids, 0, []
    for k in range(CHECK_STEPS):
        n = step_ids.shape[1]
        logits, *cache = run_function(module, "main", main_args(module, step_ids, positions(1, start, n), cache))
        start += n
        out.append(np.asarray(logits[0, -1], np.float64))
        step_ids = tokens[k:k + 1][None]
    return out


def build(out: Path, names: list[str]) -> None:
    """Per model: the reference first (fp32 capture, freed before the tvm-cuda compile: a 1B model
    is 4.4 GB per fp32 copy), then the tvm-cuda artifact without weights, then the fp16 module's
    teacher-forced logits on the interpreter (the tolerance's measurement)."""
    import bitsmith
    from bitsmith.testing.seeded_llama import SHAPES
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        model = SHAPES[name]
        d = out / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        ids = prompt_ids(model.shape.vocab, 1, PROMPT)
        hf = model.hf_model()
        params = sum(p.numel() for p in hf.parameters())
        t0 = time.perf_counter()
        ref_module = bitsmith.compile(hf, target="reference").module
        if params <= INTERPRETER_MAX_PARAMS:
            tokens, ref_logits, margins = _greedy_reference(ref_module, ids, GREEDY_STEPS)
            token_source = "reference target (interpreter), every step"
        else:
            _, ref_logits, _ = _greedy_reference(ref_module, ids, CHECK_STEPS)
            tokens, hf_logits, margins = _greedy_transformers(hf, ids, GREEDY_STEPS)
            agree = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(hf_logits, ref_logits))
            if agree > 1e-4 or not np.array_equal(tokens[:CHECK_STEPS], [int(np.argmax(x)) for x in ref_logits]):
                raise SystemExit(f"{name}: transformers and the reference target disagree ({agree:.1e})")
            token_source = (f"transformers fp32 on CPU for 32 steps; the reference target's first {CHECK_STEPS} "
                            f"positions agree with it within {agree:.1e} of max|logit|")
        del ref_module
        t1 = time.perf_counter()
        cm = bitsmith.compile(hf, target="tvm-cuda")
        del hf
        t2 = time.perf_counter()
        cm.save(str(d / "artifact"))
        (d / "artifact" / "weights.safetensors").unlink()
        seeded = set(model.parameter_shapes()) | ({"lm_head.weight"} if model.tie_word_embeddings else set())
        extra = {n: np.asarray(cm.module.tensors[n]) for n in cm.module.tensors if n not in seeded}
        np.savez(d / "unseeded_tensors.npz", **extra)
        half_logits = _teacher_forced(cm.module, ids, tokens)
        t3 = time.perf_counter()
        np.save(d / "ref_logits.npy", np.stack(ref_logits).astype(np.float32))
        np.save(d / "ref_tokens.npy", tokens)
        half_err = [float(np.abs(h - r).max()) for h, r in zip(half_logits, ref_logits)]
        info = {"model": name, "seed": model.seed, "parameters": params, "prompt": ids[0].tolist(),
                "greedy_steps": GREEDY_STEPS, "tokens_from": token_source,
                "fp16_interpreter_error": half_err, "ref_top2_margin": margins,
                "ref_max_abs": [float(np.abs(r).max()) for r in ref_logits],
                "seconds": {"reference": t1 - t0, "compile": t2 - t1, "fp16_interpreter": t3 - t2},
                "kernels": cm.report()["executable"]["kernels"]}
        (d / "reference.json").write_text(json.dumps(info, indent=1))
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"built {name}: {info['kernels']} kernels, {size / 2**20:.1f} MiB to travel, reference {t1 - t0:.0f} s, "
              f"compile {t2 - t1:.0f} s, fp16 interpreter {t3 - t2:.0f} s, its error {max(half_err):.2e}; "
              f"min top-2 margin over {GREEDY_STEPS} steps {min(margins):.3f}", flush=True)


# ---------------------------------------------------------------- run (GPU machine)

def regenerate_weights(d: Path) -> dict[str, np.ndarray]:
    from bitsmith.testing.seeded_llama import SHAPES
    info = json.loads((d / "reference.json").read_text())
    model = SHAPES[info["model"]]
    manifest = json.loads((d / "artifact" / "manifest.json").read_text())
    with np.load(d / "unseeded_tensors.npz", allow_pickle=False) as z:
        weights = {k: z[k] for k in z.files}
    weights.update(model.tensors({t["name"]: t["dtype"] for t in manifest["tensors"] if t["name"] not in weights}))
    return weights


def _cuda_time(fn: Any, sync: Any, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def compile_baseline(d: Path) -> list[str]:
    """torch.compile figures alone (its compilation takes minutes: gpu_check.sh runs it as its own step)."""
    import torch
    from bitsmith.testing.seeded_llama import SHAPES
    info = json.loads((d / "reference.json").read_text())
    model = SHAPES[info["model"]]
    lines = [f"== {info['model']}: torch.compile (transformers generate, static cache, mode reduce-overhead)"]
    hc = model.hf_model(device="cuda", dtype=torch.float16)
    hc.forward = torch.compile(hc.forward, mode="reduce-overhead", fullgraph=True)
    for b in BATCHES:
        try:
            tp = torch.from_numpy(prompt_ids(model.shape.vocab, b, PROMPT)).cuda()

            def gen_c(n: int) -> float:
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    hc.generate(tp, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                cache_implementation="static", eos_token_id=None, pad_token_id=0)
                torch.cuda.synchronize()
                return time.perf_counter() - t
            t0 = time.perf_counter()
            gen_c(8)
            gen_c(8)
            warm = time.perf_counter() - t0
            per_step = (gen_c(DECODE_TOKENS) - gen_c(1)) / (DECODE_TOKENS - 1)
            lines.append(f"{'torch.compile (HF static)':>28} {b:>5} {b / per_step:>10.1f} {1e3 * per_step:>9.3f}"
                         f"   (compile + warm-up {warm:.0f} s)")
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            lines.append(f"{'torch.compile (HF static)':>28} {b:>5} failed: {type(e).__name__}: {str(e)[:150]}")
    lines.append("done")
    return lines


def run_model(d: Path, trust: bool) -> list[str]:
    import torch
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.testing.seeded_llama import SHAPES
    info = json.loads((d / "reference.json").read_text())
    model = SHAPES[info["model"]]
    lines = [f"== {info['model']} (seed {model.seed}, {model.shape})"]
    t0 = time.perf_counter()
    weights = regenerate_weights(d)
    t1 = time.perf_counter()
    cm = load_artifact(d / "artifact", trust_native_code=trust, weights=weights)
    exe = cm.executable
    dec = exe.device_decoder(graphs=True)
    t2 = time.perf_counter()
    lines.append(f"weights regenerated in {t1 - t0:.1f} s (sha256 equal to the manifest's), loaded in {t2 - t1:.1f} s")

    # correctness: greedy 32 tokens, teacher-forced logits of the first positions
    ids = np.array([info["prompt"]], np.int64)
    ref_tokens = np.load(d / "ref_tokens.npy", allow_pickle=False)
    ref_logits = np.load(d / "ref_logits.npy", allow_pickle=False)
    got = dec.generate(ids, GREEDY_STEPS)[0, ids.shape[1]:]
    equal = int(np.cumprod(got == ref_tokens).sum())
    layout_logits = []
    from bitsmith.backends.tvm.cuda_decode import StaticCacheLayout, round_capacity
    layout = StaticCacheLayout(np.ones_like(ids), round_capacity(ids.shape[1] + CHECK_STEPS))
    layout_logits.append(dec.prefill(ids, layout)[0])
    for k in range(CHECK_STEPS - 1):
        layout_logits.append(dec.decode_step(ref_tokens[k:k + 1], layout, k)[0])
    errs = [float(np.abs(g - r).max()) for g, r in zip(layout_logits, ref_logits)]
    allowed = [max(TOL_FACTOR * e, 1e-3 * m) for e, m in zip(info["fp16_interpreter_error"], info["ref_max_abs"])]
    logits_ok = all(e <= a for e, a in zip(errs, allowed))
    margins = info["ref_top2_margin"]
    # a divergence is a rounding tie, not a bug, when the reference's top-2 margin at that step is
    # within twice the logits error allowed (each of the two logits may be off by that much)
    tie = equal < GREEDY_STEPS and equal < len(margins) and margins[equal] <= 2 * max(allowed)
    ok = logits_ok and (equal == GREEDY_STEPS or tie)
    verdict = "PASS" if ok and not tie else ("PASS (near-tie)" if ok else "FAIL")
    lines.append(f"greedy tokens equal to the reference: {equal}/{GREEDY_STEPS}"
                 + (f" (step {equal}: reference top-2 margin {margins[equal]:.2e} <= 2 x allowed logits error "
                    f"{2 * max(allowed):.2e}: a near-tie fp16 rounding may flip)" if tie else "")
                 + f"; logits max|err| {', '.join(f'{e:.2e}' for e in errs)} (allowed "
                 f"{', '.join(f'{a:.2e}' for a in allowed)}) -> {verdict}")
    lines.append(f"decode mode: {dec.mode}" + (f" (fallback: {dec.fallback_reason})" if dec.fallback_reason else ""))

    # decode tokens/s
    rows = [f"{'impl':>28} {'batch':>5} {'tok/s':>10} {'ms/step':>9}"]
    hf = model.hf_model(device="cuda", dtype=torch.float16, arrays=weights)  # the same fp16 values
    del weights
    eos_free = {"eos_token_id": None, "pad_token_id": 0}
    results: dict[tuple[str, int], float] = {}

    def row(impl: str, b: int, seconds_per_step: float) -> None:
        results[(impl, b)] = b / seconds_per_step
        rows.append(f"{impl:>28} {b:>5} {b / seconds_per_step:>10.1f} {1e3 * seconds_per_step:>9.3f}")

    for b in BATCHES:
        p = prompt_ids(model.shape.vocab, b, PROMPT)
        for graphs, impl in ((True, "tvm-cuda graph"), (False, "tvm-cuda per-kernel")):
            dd = dec if graphs else exe.device_decoder(graphs=False)
            cap = round_capacity(PROMPT + DECODE_TOKENS)
            dd.generate(p, 8, capacity=cap)  # warm-up and capture, on the buffers the timed run uses
            dd.generate(p, DECODE_TOKENS, capacity=cap)
            row(impl + ("" if dd.mode == "graph" or not graphs else " (fell back)"), b,
                dd.timings.decode_seconds / dd.timings.decode_steps)
        tp = torch.from_numpy(p).cuda()

        def hf_decode(m: Any, **kw: Any) -> float:
            def gen(n: int) -> float:
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    m.generate(tp, do_sample=False, max_new_tokens=n, min_new_tokens=n, **eos_free, **kw)
                torch.cuda.synchronize()
                return time.perf_counter() - t
            gen(8)
            return (gen(DECODE_TOKENS) - gen(1)) / (DECODE_TOKENS - 1)

        row("torch fp16 eager (HF)", b, hf_decode(hf))
    lines += rows
    for b in BATCHES:
        base = results.get(("torch fp16 eager (HF)", b))
        ours = results.get(("tvm-cuda graph", b))
        if base and ours:
            lines.append(f"batch {b}: tvm-cuda graph / torch fp16 eager = {ours / base:.2f}x")

    # prefill of 512 tokens, device-synchronized, logits left on the device
    tvm, dev = dec.tvm, dec.device
    p = prompt_ids(model.shape.vocab, 1, PREFILL)
    empty = [tvm.runtime.empty((1, int(c.type.shape[1]), 0, int(c.type.shape[3])), c.type.dtype, dev)
             for c in dec.cache_params]
    args = [tvm.runtime.tensor(p, dev), tvm.runtime.tensor(np.arange(PREFILL)[None], dev), *empty,
            tvm.runtime.tensor(np.ones((1, PREFILL), np.int64), dev)]
    pool: dict = {}
    ex_main = dec.executor
    t_ours = _cuda_time(lambda: ex_main.run_static(args, pool), dev.sync, 5)
    tp = torch.from_numpy(p).cuda()
    with torch.no_grad():
        t_torch = _cuda_time(lambda: hf(tp, use_cache=False), torch.cuda.synchronize, 5)
    lines.append(f"prefill {PREFILL} tokens: tvm-cuda {1e3 * t_ours:.2f} ms, torch fp16 eager {1e3 * t_torch:.2f} ms "
                 f"({t_torch / t_ours:.2f}x)")
    lines.append(f"correctness: {verdict}")
    return lines


def run(directory: Path, trust: bool, names: list[str], compile_only: bool) -> int:
    from bitsmith.backends.tvm.cuda_runtime import NO_GPU, gpu_available
    if not gpu_available():
        print(f"no GPU: {NO_GPU}; nothing run")
        return 2
    import torch
    print(f"machine: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    status = 0
    for name in names:
        d = directory / name
        try:
            lines = compile_baseline(d) if compile_only else run_model(d, trust)
        except Exception as e:  # noqa: BLE001 - one model's failure must not hide the other's figures
            lines = [f"== {name}: FAILED {type(e).__name__}: {str(e)[:400]}"]
        print("\n".join(lines), flush=True)
        status |= 0 if lines[-1].endswith(("PASS", "PASS (near-tie)", "done")) else 1
    return status


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--build", type=Path)
    g.add_argument("--run", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--trust-native-code", action="store_true")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile baseline (minutes)")
    a = ap.parse_args()
    names = a.models.split(",")
    if a.build:
        build(a.build, names)
    else:
        sys.exit(run(a.run, a.trust_native_code, names, a.compile_only))
