"""SmolLM2-135M on the CPU: llama.cpp vs torch eager vs every bitsmith CPU target x scheme.

    python benchmarks/decode_race.py [--threads 1,2] [--new-tokens 64] [--prompt-tokens 512]
        [--ppl-windows 4 --ppl-ctx 512] [--rows ...] [--head-rows] [--work DIR]

One run, same prompt, same thread count for every row. Rows:
* ``llama.cpp`` — llama-cpp-python (optional extra ``bench``; skipped with a message when
  ``llama_cpp`` is not importable) on the shipped GGUF (Q4_1, tied output Q8_0), greedy by
  argmax of its last logits (the same loop as ours, no sampler);
* ``eager`` — the transformers model loaded from the same GGUF (fp32), DynamicCache;
* ``<target>/<scheme>`` — ``bitsmith.compile("smollm2-135m", target, quant=scheme)`` for
  target in tvm-llvm, lut-cpu and scheme in gguf (the file's own blocks), rtn-int4,
  bitmod-w4, bitmod-w3, shiftadd-w3 (uncalibrated: speed only, its quality needs calibrate),
  rtn-int2 (groups of 128) and fp32 (no quant); decoding on the KV cache ``generate()`` uses
  (in place where the executable offers it);
* ``tvm-llvm/gguf-a8``, ``-kv16``, ``-a8-kv16`` — gguf with what llama.cpp also does: the option
  ``activation_bits=8`` (W4A8: the Q4 / Q8_0 layers take int8 activations per group of 32 and
  integer dot products, as llama.cpp's Q4 x Q8 dots do) and/or ``kv_dtype="float16"`` (the
  in-place KV cache in float16, llama.cpp's default cache type). Perplexity is scored through
  the in-place cache generate() uses, so the float16 cache's cost is in it;
* ``tvm-llvm/rtn-int2-a8``, ``rtn-int4-a8``, ``bitmod-w3-a8`` — the same option on codes in
  groups of 128 (``qlinear_a8_wide``: zero points or BitMoD's grid tables; activations in int8
  blocks of 128, like llama.cpp's K-quant dots against Q8_K blocks of 256), lm_head (rtn-int8)
  included; ``bitmod-w3-a8-kv16`` with llama.cpp's float16 KV cache as well.
``--head-rows`` adds the lm_head variants of issue 15 part 4 for bitmod-w4 and bitmod-w3
(``/head-fp32``, ``/head-int8``, ``/head-same``: compile option ``head_quant``) other than the
default, which the plain rows use.

Every row sees the same token ids (bitsmith's tokenizer of the GGUF; llama.cpp is fed ids,
no BOS). Per row and thread count, in a fresh process (thread pools are fixed at first use):
* prefill: one forward over a ``--prompt-tokens`` prompt (the start of sensesensibility.txt)
  from an empty KV cache; tokens/s = prompt tokens / seconds; every runtime computes the last
  position's logits only (llama.cpp's default, transformers' ``logits_to_keep=1``, bitsmith's
  ``last_only`` session step), as generation does;
* time to first token: the row's own tokenizer on the prompt text, then the prefill and argmax
  (the prefill itself runs on the shared ids; whether the row's tokenizer gave the same ids is
  recorded);
* decode: ``--new-tokens`` greedy tokens after that prompt; tokens/s over all but the first
  (which the prefill produced);
* once per row (at the largest thread count): perplexity over the first ``--ppl-windows``
  windows of ``--ppl-ctx`` tokens of prideprejudice.txt (bitsmith.runtime.perplexity's
  protocol: no BOS, each window from an empty cache; llama.cpp's from its own logits with
  ``logits_all=True``), and bits per weight: bitsmith's ``report()["bits_per_weight"]``, over
  the *quantized* linear layers (an fp32 lm_head is not in it; fp32 rows: 32); llama.cpp: the
  GGUF's 2-D tensors, all quantized, the tied token_embd counted once as lm_head.
Rows run interleaved (round r visits every row; odd rounds in reverse order) so all see the
same machine load; the load average is recorded per measurement. Results:
benchmarks/results/decode_race.md and .json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
TEXT_DIR = next((p / "shared" / "data" / "text" for p in HERE.parents
                 if (p / "shared" / "data" / "text").is_dir()), HERE.parents[1] / "shared" / "data" / "text")
EVAL_TEXT = TEXT_DIR / "prideprejudice.txt"
PROMPT_TEXT = TEXT_DIR / "sensesensibility.txt"
TARGETS = ("tvm-llvm", "lut-cpu")
SCHEMES = ("gguf", "rtn-int4", "bitmod-w4", "bitmod-w3", "shiftadd-w3", "rtn-int2", "fp32")
HEAD_VARIANTS = ("head-fp32", "head-int8", "head-same")  # lm_head: fp32, rtn-int8, the scheme's width
HEAD_SCHEMES = ("bitmod-w4", "bitmod-w3")
LIKE_LLAMA_CPP = ("a8", "kv16", "a8-kv16")  # gguf with llama.cpp's own approximations (docstring)
LOW_BIT_A8 = ("rtn-int2-a8", "rtn-int4-a8", "bitmod-w3-a8", "bitmod-w3-a8-kv16")  # tvm-llvm int8-activation kernels, wide groups
GROUP_SIZE = 128


def compile_kwargs(row: str) -> dict:
    """bitsmith.compile keyword arguments of a ``target/scheme[/head-variant]`` row."""
    parts = row.split("/")
    target, scheme, head = parts[0], parts[1], (parts[2] if len(parts) > 2 else None)
    kw: dict = {"target": target}
    if scheme.endswith("-kv16"):  # SCHEME[-a8][-kv16]
        kw["kv_dtype"], scheme = "float16", scheme.removesuffix("-kv16")
    if scheme.endswith("-a8"):
        kw["activation_bits"], scheme = 8, scheme.removesuffix("-a8")
    if scheme == "gguf":
        kw["quant"] = "gguf"
    elif scheme != "fp32":
        kw.update(quant=scheme, group_size=GROUP_SIZE)
    if head is not None:
        kw["head_quant"] = head.removeprefix("head-")
    return kw


def all_rows(head_rows: bool) -> list[str]:
    rows = ["llama.cpp", "eager"] + [f"{t}/{s}" for t in TARGETS for s in SCHEMES] + [
        f"tvm-llvm/gguf-{v}" for v in LIKE_LLAMA_CPP] + [f"tvm-llvm/{s}" for s in LOW_BIT_A8]
    if head_rows:  # the variants that differ from the default (the plain rows)
        from bitsmith.compression import CompressionOptions
        default = f"head-{CompressionOptions().head_quant}"
        rows += [f"{t}/{s}/{h}" for h in HEAD_VARIANTS if h != default for t in TARGETS for s in HEAD_SCHEMES]
    return rows


def _thread_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    return env


def _worker(args: list[str], env: dict[str, str]) -> dict | None:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        print(f"worker {args[:2]} failed (exit {out.returncode}); row left out", file=sys.stderr, flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- shared by the workers

def _greedy(step, prompt_ids: list[int], new_tokens: int) -> dict:
    """``step(ids, prefill)`` -> next token id. Times prefill and the decode steps after it."""
    t0 = time.perf_counter()
    nxt = step(prompt_ids, True)
    t1 = time.perf_counter()
    tokens = [nxt]
    for _ in range(new_tokens - 1):
        nxt = step([nxt], False)
        tokens.append(nxt)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def _time_row(step, tokenize, prompt: dict, new_tokens: int) -> dict:
    """Warm-up, then one timed run: tokenize the prompt's text with the row's own tokenizer,
    prefill the shared prompt ids, argmax (time to first token = all three; prefill = the
    forward alone), then the greedy decode steps. The warm-up prefills the whole prompt once:
    buffers sized by the prompt (llama.cpp allocates its batch buffers when the context is made,
    bitsmith's executors on the first run of that length: 1-2 s of page faults for 512 tokens)
    and thread pools are then ready in every row, so prefill measures the forward alone."""
    ids = prompt["ids"]
    step(ids, True)  # warm-up: thread pools, first-call costs, buffers for the prompt's length
    step([ids[8]], False)
    t0 = time.perf_counter()
    own = list(tokenize(prompt["text"]))
    run = _greedy(step, ids, new_tokens)
    ttft = time.perf_counter() - t0 - run["decode_s"]
    return {**run, "ttft_s": ttft, "own_tokenizer_same_ids": own == ids, "prompt_tokens": len(ids)}


def _nll(logits, targets):
    from bitsmith.runtime.perplexity import token_nll
    return token_nll(logits, targets)


def _ppl_from_logits(window_logits, windows: list) -> dict:
    """Perplexity from (logits [ctx, vocab], window ids) pairs, bitsmith.runtime.perplexity's protocol."""
    import math

    import numpy as np
    nll = np.concatenate([_nll(lg[:-1], np.asarray(w[1:])) for lg, w in zip(window_logits, windows)])
    return {"ppl": math.exp(float(nll.mean())), "nll": float(nll.mean()), "tokens_scored": int(nll.size)}


def _windows(ids: list[int], ctx: int, count: int) -> list[list[int]]:
    return [ids[i * ctx:(i + 1) * ctx] for i in range(min(count, len(ids) // ctx))]


# ---------------------------------------------------------------- workers (fresh processes)

def compile_worker(row: str, out_dir: str) -> dict:
    import bitsmith
    kw = compile_kwargs(row)
    t0 = time.perf_counter()
    cm = bitsmith.compile(MODEL, **kw)
    seconds = time.perf_counter() - t0
    cm.save(out_dir)
    return {"row": row, "compile_s": seconds, "bits_per_weight": cm.report()["bits_per_weight"]}


def prepare_worker(artifact: str, prompt_tokens: int, ppl_ctx: int, ppl_windows: int) -> dict:
    """The prompt (text and ids) and perplexity windows every row gets, from one tokenizer
    (the compiled model's: the GGUF's vocabulary)."""
    import bitsmith
    tok = bitsmith.load(artifact).tokenizer()
    start = tok.encode(PROMPT_TEXT.read_text(encoding="utf-8")[:20000]).ids[:prompt_tokens + 8]
    text = tok.decode(tok.encode(tok.decode(start)).ids[:prompt_tokens])  # a cut that re-encodes stably
    ids = tok.encode(text).ids
    eval_ids = tok.encode(EVAL_TEXT.read_text(encoding="utf-8")).ids
    return {"text": text, "ids": ids, "ppl_windows": _windows(eval_ids, ppl_ctx, ppl_windows)}


def llama_worker(threads: int, new_tokens: int, prompt: dict, ppl: dict | None) -> dict:
    import numpy as np
    try:
        from llama_cpp import Llama
    except ImportError as e:
        return {"skipped": f"llama_cpp not importable ({e}); pip install '.[bench]' (see README)"}
    from bitsmith.frontend.models import zoo_gguf_path
    path = str(zoo_gguf_path(MODEL))
    n_ctx = prompt["n_ctx"]
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def step(ids, prefill):
        if prefill:
            llm.reset()
        llm.eval(ids)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(logits.argmax())

    def tokenize(text):
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    res = _time_row(step, tokenize, prompt, new_tokens)
    res["executor"] = "llama.cpp (llama-cpp-python)"
    llm = None  # frees the model before the scorer loads (step and tokenize are done with it)
    if ppl:
        scorer = Llama(model_path=path, n_ctx=ppl["ctx"], n_batch=ppl["ctx"], n_threads=threads,
                       n_threads_batch=threads, logits_all=True, verbose=False)
        logits = []
        for w in ppl["windows"]:
            scorer.reset()
            scorer.eval(w)
            logits.append(np.array(scorer.scores[:len(w)], dtype=np.float32))
        res["ppl"] = _ppl_from_logits(logits, ppl["windows"])
        res["bits_per_weight"] = _gguf_bits_per_weight(path)
    return res


def _gguf_bits_per_weight(path: str) -> float:
    """8 x bytes / weights over the file's 2-D tensors (the tied token_embd is the lm_head)."""
    from bitsmith.gguf import open_gguf
    f = open_gguf(path)
    bits, count = 0, 0
    for t in f.tensors:
        if len(t.shape) == 2:
            bits += 8 * len(f.tensor_bytes(t))
            count += int(t.shape[0]) * int(t.shape[1])
    return bits / count


def eager_worker(threads: int, new_tokens: int, prompt: dict, ppl: dict | None) -> dict:
    import numpy as np
    import torch
    from transformers import DynamicCache

    from bitsmith.frontend.models import load_pretrained
    torch.set_num_threads(threads)
    model, tok = load_pretrained(MODEL)
    model.train(False)
    state = {}

    def step(ids, prefill):
        with torch.inference_mode():
            if prefill:
                state["cache"] = DynamicCache()
            out = model(input_ids=torch.tensor([ids]), past_key_values=state["cache"], use_cache=True,
                        logits_to_keep=1)  # the last position's logits only, as generation needs
            state["cache"] = out.past_key_values
            return int(out.logits[0, -1].argmax())

    res = _time_row(step, lambda text: tok(text)["input_ids"], prompt, new_tokens)
    res["executor"] = "torch eager (transformers, fp32)"
    if ppl:
        logits = []
        with torch.inference_mode():
            for w in ppl["windows"]:
                logits.append(model(input_ids=torch.tensor([w])).logits[0].numpy().astype(np.float32))
        res["ppl"] = _ppl_from_logits(logits, ppl["windows"])
        res["bits_per_weight"] = 32.0
    return res


def compiled_worker(artifact: str, new_tokens: int, prompt: dict, ppl: dict | None) -> dict:
    import numpy as np

    import bitsmith
    from bitsmith.runtime.generate import empty_cache, positions
    from bitsmith.runtime.perplexity import perplexity
    from bitsmith.runtime.generate import has_attention_mask, round_capacity
    cm = bitsmith.load(artifact)
    state = {}
    # the KV cache generate() uses: in place where the executable offers it, else concat
    session = cm.executable.kv_session() if has_attention_mask(cm.module) else None

    def step(ids, prefill):
        inp = np.asarray([ids], dtype=np.int64)
        if prefill:
            state["pos"] = 0
            if session is not None:
                session.start(1, round_capacity(prompt["n_ctx"]))
            else:
                state["cache"] = empty_cache(cm.module, 1)
        pos = positions(1, state["pos"], inp.shape[1])
        state["pos"] += inp.shape[1]
        if session is not None:
            logits = session.step(inp, pos, np.ones((1, state["pos"]), dtype=np.int64), last_only=True)
        else:
            logits, *state["cache"] = cm.run("main", [inp, pos, *state["cache"]])
        return int(logits[0, -1].argmax())

    tok = cm.tokenizer()
    res = _time_row(step, lambda text: tok.encode(text).ids, prompt, new_tokens)
    rep = cm.report()
    ex = rep.get("executable", {})
    res["executor"] = (str(ex.get("executor", cm.target)) + (f"; host {ex['host']}" if "host" in ex else "")
                       + ("; KV in place" if session is not None else "; KV concat"))
    if ppl:
        ids = np.asarray([t for w in ppl["windows"] for t in w], dtype=np.int64)
        p = perplexity(cm, ids, ctx=ppl["ctx"], windows=len(ppl["windows"]))
        res["ppl"] = {"ppl": p["ppl"], "nll": p["nll"], "tokens_scored": p["tokens_scored"]}
        res["bits_per_weight"] = rep["bits_per_weight"]
    return res


def run_worker(row: str, threads: int, new_tokens: int, prompt: dict, ppl: dict | None,
               artifact: str | None) -> dict:
    prompt = {**prompt, "n_ctx": len(prompt["ids"]) + new_tokens + 16}
    load = os.getloadavg()[0]
    if row == "llama.cpp":
        res = llama_worker(threads, new_tokens, prompt, ppl)
    elif row == "eager":
        res = eager_worker(threads, new_tokens, prompt, ppl)
    else:
        res = compiled_worker(artifact, new_tokens, prompt, ppl)
    return {"row": row, "threads": threads, "load_before": load, "load_after": os.getloadavg()[0], **res}


# ---------------------------------------------------------------- report

def _fmt(x, spec, missing="—"):
    return missing if x is None else format(x, spec)


def report(results: list[dict], compiles: dict, args, machine: str) -> str:
    lines = [f"# Decode race: SmolLM2-135M, greedy, {args.new_tokens} new tokens after a "
             f"{args.prompt_tokens}-token prompt", "",
             f"Machine: {machine}. Same token ids for every row; each (row, threads) in a fresh process, "
             "rows interleaved. Perplexity: first "
             f"{args.ppl_windows} windows of {args.ppl_ctx} tokens of prideprejudice.txt (no BOS). "
             "bits/weight: the quantized linear layers (llama.cpp: every 2-D tensor). `load` = 1-minute load average before/after "
             "the row (2 shared cores: wall-clock figures move with it).", ""]
    skipped = sorted({r["row"]: r["skipped"] for r in results if "skipped" in r}.items())
    for row, why in skipped:
        lines += [f"**{row} skipped**: {why}", ""]
    done = [r for r in results if "skipped" not in r]
    quality = {r["row"]: r for r in done if "ppl" in r}
    llama = {}
    for r in done:
        if r["row"] == "llama.cpp":
            llama.setdefault(r["threads"], []).append(r)
    lines += ["| threads | row | decode tok/s | vs llama.cpp | prefill tok/s | vs llama.cpp | TTFT ms | "
              "bits/weight | ppl | load | executor |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for threads in sorted({r["threads"] for r in done}):
        by_row: dict[str, list[dict]] = {}
        for r in done:
            if r["threads"] == threads:
                by_row.setdefault(r["row"], []).append(r)
        base = llama.get(threads)
        base_dec = max(_decode_tps(r) for r in base) if base else None
        base_pre = max(_prefill_tps(r) for r in base) if base else None
        for row, runs in by_row.items():
            dec = max(_decode_tps(r) for r in runs)  # best of the rounds (least disturbed by other work)
            pre = max(_prefill_tps(r) for r in runs)
            ttft = min(r["ttft_s"] for r in runs) * 1e3
            q = quality.get(row, {})
            loads = "/".join(f"{r['load_before']:.1f}-{r['load_after']:.1f}" for r in runs)
            lines.append(
                f"| {threads} | {row} | {dec:.1f} | {_ratio(dec, base_dec)} | "
                f"{pre:.0f} | {_ratio(pre, base_pre)} | {ttft:.0f} | "
                f"{_fmt(q.get('bits_per_weight'), '.3f')} | {_fmt(q.get('ppl', {}).get('ppl'), '.3f')} | "
                f"{loads} | {runs[0]['executor']} |")
    lines += paired_table(done)
    if compiles:
        lines += ["", "| row | compile s (wall) | bits/weight |", "|---|---:|---:|"]
        for row, c in compiles.items():
            lines.append(f"| {row} | {c['compile_s']:.1f} | {c['bits_per_weight']:.3f} |")
    lines += ["", f"Command: `python benchmarks/decode_race.py {' '.join(sys.argv[1:])}`", ""]
    return "\n".join(lines)


def paired_table(done: list[dict]) -> list[str]:
    """Each row's k-th run of a run (``part`` of a merge) against llama.cpp's k-th at the same
    thread count: both ran in the same round, minutes apart, so the ratio cancels most of what a
    shared machine's load does to both (the best-of table above compares rounds that may not)."""
    runs: dict[tuple, list[dict]] = {}
    for r in done:
        runs.setdefault((r.get("part", 0), r["threads"], r["row"]), []).append(r)
    pairs: dict[tuple, list[tuple[float, float, float, float]]] = {}
    for (part, threads, row), rs in runs.items():
        base = runs.get((part, threads, "llama.cpp"), [])
        for r, b in zip(rs, base):
            pairs.setdefault((threads, row), []).append(
                (_decode_tps(r), _decode_tps(r) / _decode_tps(b), _prefill_tps(r), _prefill_tps(r) / _prefill_tps(b)))
    if not pairs:
        return []
    out = ["", "Paired per round (medians over the rounds; decode ratio's range in brackets):", "",
           "| threads | row | rounds | decode tok/s | decode vs llama.cpp | prefill tok/s | prefill vs llama.cpp |",
           "|---:|---|---:|---:|---|---:|---:|"]
    for threads, row in sorted(pairs, key=lambda k: (k[0], k[1] != "llama.cpp", k[1])):
        v = pairs[(threads, row)]
        ratios = [x[1] for x in v]
        out.append(f"| {threads} | {row} | {len(v)} | {statistics.median(x[0] for x in v):.1f} | "
                   f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}-{max(ratios):.2f}) | "
                   f"{statistics.median(x[2] for x in v):.0f} | {statistics.median(x[3] for x in v):.2f}× |")
    return out


def _ratio(ours: float, base: float | None) -> str:
    return f"{ours / base:.2f}×" if base else "—"


def _decode_tps(r: dict) -> float:
    return (len(r["tokens"]) - 1) / r["decode_s"]


def _prefill_tps(r: dict) -> float:
    return r["prompt_tokens"] / r["prefill_s"]


# ---------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--ppl-ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all; see the docstring)")
    ap.add_argument("--head-rows", action="store_true", help="add the lm_head variants (issue 15 part 4)")
    ap.add_argument("--work", default=None, help="folder for artifacts and the kernel cache (kept; reused)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_race.md"))
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only write the report from the .json files of earlier (partial) runs")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_payload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._worker:
        p = json.loads(a._payload)
        if a._worker == "compile":
            res = compile_worker(p["row"], p["out"])
        elif a._worker == "prepare":
            res = prepare_worker(p["artifact"], p["prompt_tokens"], p["ppl_ctx"], p["ppl_windows"])
        else:
            res = run_worker(p["row"], p["threads"], p["new_tokens"], p["prompt"], p["ppl"], p["artifact"])
        print(json.dumps(res))
        return

    sys.path.insert(0, str(HERE))
    from machine import machine_line

    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        results = [{**r, "part": r.get("part", k)} for k, part in enumerate(parts) for r in part["results"]]
        compiles = {k: v for part in parts for k, v in part["compiles"].items()}
        for key in ("new_tokens", "prompt_tokens", "ppl_windows", "ppl_ctx"):  # the runs' own settings
            setattr(a, key, max(part["args"][key] for part in parts))
        Path(a.out).with_suffix(".json").write_text(json.dumps(
            {"machine": parts[0]["machine"], "merged": a.merge, "parts": [p["args"] for p in parts],
             "compiles": compiles, "results": results}, indent=1))
        text = report(results, compiles, a, parts[0]["machine"])
        Path(a.out).write_text(text)
        print(text)
        return

    known = all_rows(True)
    rows = [r for r in (a.rows.split(",") if a.rows else all_rows(a.head_rows)) if r]
    unknown = [r for r in rows if r not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(known)}")
    work = Path(a.work or tempfile.mkdtemp(prefix="bitsmith-decode-race-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**_thread_env(None), "BITSMITH_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}

    compiles, artifacts = {}, {}
    for row in rows:
        if "/" not in row:
            continue
        artifacts[row] = str(work / row.replace("/", "_"))
        if (Path(artifacts[row]) / "manifest.json").exists():
            continue  # --work reused: compiled by an earlier run
        print(f"compiling {row} ...", file=sys.stderr, flush=True)
        res = _worker(["--_worker", "compile", "--_payload", json.dumps({"row": row, "out": artifacts[row]})], env)
        if res is None:
            artifacts.pop(row)
        else:
            compiles[row] = res
    rows = [r for r in rows if "/" not in r or r in artifacts]

    thread_counts = [int(x) for x in a.threads.split(",")]
    results = []
    if not artifacts:
        raise SystemExit("the prompt is tokenized by a compiled row's tokenizer: keep at least one bitsmith row")
    prep = _worker(["--_worker", "prepare", "--_payload", json.dumps(
        {"artifact": next(iter(artifacts.values())), "prompt_tokens": a.prompt_tokens, "ppl_ctx": a.ppl_ctx,
         "ppl_windows": a.ppl_windows})], env)
    if prep is None:
        raise SystemExit("could not tokenize the prompt and the perplexity text")
    prompt = {"text": prep["text"], "ids": prep["ids"]}
    ppl_spec = {"ctx": a.ppl_ctx, "windows": prep["ppl_windows"]}
    for rnd in range(a.rounds):
        for t in thread_counts:
            order = rows if rnd % 2 == 0 else rows[::-1]
            for row in order:
                with_ppl = rnd == 0 and t == max(thread_counts) and a.ppl_windows > 0
                print(f"round {rnd} threads {t}: {row}{' (+ perplexity)' if with_ppl else ''}",
                      file=sys.stderr, flush=True)
                payload = {"row": row, "threads": t, "new_tokens": a.new_tokens, "prompt": prompt,
                           "ppl": ppl_spec if with_ppl else None, "artifact": artifacts.get(row)}
                res = _worker(["--_worker", "run", "--_payload", json.dumps(payload)], {**env, **_thread_env(t)})
                if res is not None:
                    results.append(res)
                    if "skipped" in res:
                        print(f"  {row}: skipped: {res['skipped']}", file=sys.stderr, flush=True)
                    else:
                        print(f"  decode {_decode_tps(res):.1f} tok/s, prefill {_prefill_tps(res):.0f} tok/s"
                              + (f", ppl {res['ppl']['ppl']:.3f}" if "ppl" in res else ""), file=sys.stderr,
                              flush=True)
                Path(a.out).with_suffix(".json").write_text(json.dumps(
                    {"machine": machine_line(), "args": vars(a), "compiles": compiles, "results": results}, indent=1))
    text = report(results, compiles, a, machine_line())
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
