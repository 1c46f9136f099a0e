"""Quality of the quantization schemes: SmolLM2-135M perplexity on Pride and Prejudice.

Every number is measured on the compiled model (reference target, computed from its packed
codes): the first N non-overlapping windows of ``ctx`` tokens of prideprejudice.txt, no BOS
token (bitsmith.runtime.perplexity). Calibration reads only sensesensibility.txt.

SmolLM2-135M's weights arrive as GGUF Q4_1 (asymmetric int4, blocks of 32): re-quantizing
with exactly that scheme would be lossless and mean nothing. Every row here uses groups of
128 along the input features, so rtn-int4 g128 is a real (lossy) result.

    python benchmarks/quality.py                 # all rows, 64 windows of 1024 tokens
    python benchmarks/quality.py --rows fp32 bitmod-w3 --windows 8
    python benchmarks/quality.py --smoke         # 2 windows of 128 tokens, fp32 + rtn-int4
    python benchmarks/quality.py --target tvm-llvm --rows bitmod-w4+calibrate+act_order

``--target`` compiles and evaluates on another target (tvm-llvm equals the reference under the
same quantization within its stated tolerance, and is several times faster); each row records
its target and its calibration settings.

Results go to benchmarks/results/quality.md and quality.json (``--smoke``: quality-smoke.*),
rewritten after every row; rows already in quality.json measured with the same settings are
kept, so a long run can be done in pieces.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_line  # noqa: E402

# shared/ beside the checkout (a git worktree sits one level deeper than the main checkout)
TEXT_DIR = next((p / "shared" / "data" / "text" for p in Path(__file__).resolve().parents
                 if (p / "shared" / "data" / "text").is_dir()), Path(__file__).resolve().parents[2] / "shared" / "data" / "text")
EVAL_TEXT = TEXT_DIR / "prideprejudice.txt"
CALIB_TEXT = TEXT_DIR / "sensesensibility.txt"
MODEL = "smollm2-135m"
GROUP_SIZE = 128


@dataclass(frozen=True)
class Row:
    key: str
    quant: str | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def calibrated(self) -> bool:
        return bool(self.options.get("calibrate"))

    @property
    def keeps_source(self) -> bool:
        """quant="gguf": the file's own blocks, no group size (compiled from the GGUF by name)."""
        return self.quant == "gguf"

    def compile_kwargs(self) -> dict[str, Any]:
        if self.quant is None:
            return {}
        if self.keeps_source:
            return {"quant": self.quant, **self.options}
        out = {"quant": self.quant, "group_size": GROUP_SIZE, **self.options}
        if self.calibrated:
            out["calib_text"] = str(CALIB_TEXT)
        return out


CAL = {"calibrate": True}
ACT = {**CAL, "act_order": True}
SEQ = {**CAL, "calib_sequential": True}
SEQ_ACT = {**SEQ, "act_order": True}
CALIBRATION_ROWS = tuple(Row(f"{q}{suffix}", q, opts) for q in ("bitmod-w4", "bitmod-w3", "rtn-int4", "rtn-int3")
                         for suffix, opts in (("+calibrate", CAL), ("+calibrate+act_order", ACT),
                                              ("+calibrate+sequential", SEQ),
                                              ("+calibrate+sequential+act_order", SEQ_ACT)))
ROWS: tuple[Row, ...] = (
    Row("fp32", None),
    Row("rtn-int4", "rtn-int4"),
    Row("fp4", "fp4"),
    Row("bitmod-w4", "bitmod-w4"),
    Row("rtn-int3", "rtn-int3"),
    Row("fp3", "fp3"),
    Row("bitmod-w3", "bitmod-w3"),
    Row("bitmod-w3+calibrate", "bitmod-w3", CAL),
    Row("bitmod-w4+calibrate", "bitmod-w4", CAL),
    Row("bitmod-w3+calibrate+outliers0.5%", "bitmod-w3", {**CAL, "outliers": 0.005}),
    Row("bitmod-w4+2:4", "bitmod-w4", {"sparsity": "2:4", "sparsity_method": "magnitude"}),
    Row("gguf", "gguf"),
) + tuple(r for r in CALIBRATION_ROWS if r.key not in ("bitmod-w3+calibrate", "bitmod-w4+calibrate"))
# ShiftAddLLM (pass shiftadd, docs/shiftadd.md): pow2 scales with the per-group offset (the
# default), with and without calibration, the per-layer allocation at 3.0 bits, the same without
# the offset (how the paper stores them), and rtn-int2 beside shiftadd-w2
BUDGET = {"bits_budget": 3.0}
NO_OFFSET = {"shiftadd_offset": False}
SHIFTADD_ROWS = tuple(Row(f"shiftadd-w{b}{off_key}{suffix}", f"shiftadd-w{b}", {**off, **opts})
                      for off_key, off in (("", {}), ("+no-offset", NO_OFFSET)) for b in (2, 3, 4)
                      for suffix, opts in (("", {}), ("+calibrate", CAL))) + tuple(
    Row(f"shiftadd-auto3.0{off_key}{suffix}", "shiftadd-auto", {**BUDGET, **off, **opts})
    for off_key, off in (("", {}), ("+no-offset", NO_OFFSET)) for suffix, opts in (("", {}), ("+calibrate", CAL))
) + (
    Row("rtn-int2", "rtn-int2"),
    Row("rtn-int2+calibrate", "rtn-int2", CAL),
    Row("rtn-int2+calibrate+act_order", "rtn-int2", ACT),
)
ROWS = ROWS + SHIFTADD_ROWS
ROW_BY_KEY = {r.key: r for r in ROWS}
SMOKE_ROWS = ("fp32", "rtn-int4")


# ------------------------------------------------------------------------------- measuring

def compile_row(row: Row, model: Any, tokenizer: Any, target: str = "reference",
                extra: dict[str, Any] | None = None) -> Any:
    """Compiles the loaded module; a calibrated row needs the tokenizer for its text: passed
    as ``tokenizer=`` where compile takes it, else the model is compiled by name."""
    import bitsmith

    kwargs = {**row.compile_kwargs(), **(extra if row.calibrated and extra else {})}
    if row.keeps_source:  # the GGUF's blocks come with the file, not with the loaded module
        return bitsmith.compile(MODEL, target=target, **kwargs)
    if row.calibrated:
        if "tokenizer" in inspect.signature(bitsmith.compile).parameters:
            return bitsmith.compile(model, target=target, tokenizer=tokenizer, **kwargs)
        return bitsmith.compile(MODEL, target=target, **kwargs)
    return bitsmith.compile(model, target=target, **kwargs)


def measure(row: Row, model: Any, tokenizer: Any, ids: Any, ctx: int, windows: int, target: str = "reference",
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from bitsmith.evaluation import quantization_summary
    from bitsmith.runtime.perplexity import perplexity

    t0 = time.perf_counter()
    cm = compile_row(row, model, tokenizer, target, extra)
    compile_seconds = time.perf_counter() - t0

    def bar(done: int, total: int) -> None:
        print(f"\r  {row.key}: window {done}/{total} ({time.perf_counter() - t1:.0f}s)", end="",
              file=sys.stderr, flush=True)

    t1 = time.perf_counter()
    result = perplexity(cm, ids, ctx=ctx, windows=windows, progress=bar)
    print(file=sys.stderr)
    summary = quantization_summary(cm)
    del cm
    gc.collect()
    options = {**row.compile_kwargs(), **(extra if row.calibrated and extra else {})}
    return {"row": row.key, "target": target, "compile_options": options, **summary,
            "compile_wall_seconds": compile_seconds, "ppl": result["ppl"], "nll": result["nll"],
            "windows": result["windows"], "ctx": result["ctx"], "tokens_scored": result["tokens_scored"],
            "eval_seconds": result["seconds"]}


# ------------------------------------------------------------------------------- reporting

def with_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next((r["ppl"] for r in rows if r["row"] == "fp32"), None)
    for r in rows:
        r["delta_ppl"] = None if base is None else r["ppl"] - base
        r["delta_pct"] = None if base is None else 100.0 * (r["ppl"] - base) / base
    return rows


def goals(rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """(goal, met or None when a row it needs was not measured, detail)."""
    ppl = {r["row"]: r["ppl"] for r in rows}
    out: list[tuple[str, bool | None, str]] = []

    def need(*keys: str) -> bool:
        return all(k in ppl for k in keys)

    for w in (3, 4):
        keys = (f"bitmod-w{w}", f"rtn-int{w}", f"fp{w}")
        text = f"{w}-bit: bitmod-w{w} below rtn-int{w} and fp{w}"
        if need(*keys):
            detail = " vs ".join(f"{k} {ppl[k]:.3f}" for k in keys)
            out.append((text, ppl[keys[0]] < min(ppl[keys[1]], ppl[keys[2]]), detail))
        else:
            out.append((text, None, "not measured"))
    text = "calibrate at least halves bitmod-w3's gap to fp32"
    if need("fp32", "bitmod-w3", "bitmod-w3+calibrate"):
        gap, cal_gap = ppl["bitmod-w3"] - ppl["fp32"], ppl["bitmod-w3+calibrate"] - ppl["fp32"]
        out.append((text, cal_gap <= 0.5 * gap, f"gap {gap:.3f} -> {cal_gap:.3f} ({cal_gap / gap:.0%} of it)"
                    if gap else f"gap {gap:.3f} -> {cal_gap:.3f}"))
    else:
        out.append((text, None, "not measured"))
    text = "bitmod-w4+calibrate within 5% of fp32"
    if need("fp32", "bitmod-w4+calibrate"):
        pct = 100.0 * (ppl["bitmod-w4+calibrate"] / ppl["fp32"] - 1)
        out.append((text, pct <= 5.0, f"{pct:+.2f}%"))
    else:
        out.append((text, None, "not measured"))
    for w, limit in ((4, 10.0), (3, 50.0)):  # issue 11: with the improved calibration options
        text = f"best calibrated bitmod-w{w} within +{limit:.0f}% of fp32"
        variants = [k for k in ppl if k.startswith(f"bitmod-w{w}+calibrate") and "outliers" not in k]
        if need("fp32") and variants:
            best = min(variants, key=ppl.__getitem__)
            pct = 100.0 * (ppl[best] / ppl["fp32"] - 1)
            out.append((text, pct <= limit, f"{best} {pct:+.2f}%"))
        else:
            out.append((text, None, "not measured"))
    for w, factor in ((3, 1.0), (2, 0.5)):  # issue 11: best calibrated shiftadd vs best calibrated rtn
        ours = [k for k in ppl if k.startswith(f"shiftadd-w{w}") and k.endswith("+calibrate")]
        theirs = [k for k in ppl if k.startswith(f"rtn-int{w}+calibrate")]
        text = (f"shiftadd-w{w}+calibrate below rtn-int{w}+calibrate" if factor == 1.0
                else f"shiftadd-w{w}+calibrate far below rtn-int{w}+calibrate (at most half its gap to fp32)")
        if need("fp32") and ours and theirs:
            key, other = min(ours, key=ppl.__getitem__), min(theirs, key=ppl.__getitem__)
            gap, other_gap = ppl[key] - ppl["fp32"], ppl[other] - ppl["fp32"]
            out.append((text, gap < factor * other_gap, f"best: {key} {ppl[key]:.3f} vs {other} {ppl[other]:.3f}"))
        else:
            out.append((text, None, "not measured"))
    return out


def _head(r: dict[str, Any]) -> str:
    """How lm_head was stored: SmolLM2 has 210 linear layers besides it, so a quantized head is
    the 211th quantized layer (rows written before the field existed carry only the count)."""
    if r["row"] == "fp32" or r["row"] == "gguf":
        return "fp32" if r["row"] == "fp32" else "Q8_0"
    return r.get("lm_head") or ("rtn-int8" if r.get("quantized_layers") == 211 else "fp32")


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Quantization quality: SmolLM2-135M on Pride and Prejudice",
        "",
        f"Perplexity of the compiled model (computed from its packed codes, on the target of each row) over the "
        f"first {meta['windows']} non-overlapping windows of {meta['ctx']} tokens of `{meta['eval_text']}` "
        f"(no BOS; {meta['ctx'] - 1} tokens scored per window). Calibration text: `{meta['calib_text']}` "
        f"only. All quantized rows but gguf use groups of {GROUP_SIZE}; embeddings stay fp32 and lm_head is "
        "stored as its column says (fp32 in rows measured before the rtn-int8 head became the default, "
        "issue 15); bits/weight counts every quantized layer, lm_head included. "
        "SmolLM2 ships as Q4_1 (int4, blocks of 32) with a Q8_0 tied embedding/lm_head: row gguf "
        "(quant='gguf') keeps exactly those blocks, lm_head included, and the fp32 row is those "
        "weights dequantized, so the two must agree.",
        "",
        "Rows whose target column says tvm-llvm were compiled and evaluated there (it equals the reference "
        "under the same quantization within its tolerance); calib seq: calibration sequences of 512 tokens.",
        "",
        "| row | ppl | Δ ppl | Δ % | bits/weight | lm_head | model MB | quantize s | eval s | target | calib seq |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        opts = r.get("compile_options", {})
        calib = opts.get("calib_sequences", 64) if opts.get("calibrate") else "-"
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {_num(r['delta_ppl'], '+.3f')} | "
                     f"{_num(r['delta_pct'], '+.2f')} | {_num(r['bits_per_weight'], '.3f')} | {_head(r)} | "
                     f"{r['model_bytes'] / 1e6:.1f} | {r['quantize_seconds']:.1f} | {r['eval_seconds']:.1f} | "
                     f"{r.get('target', 'reference')} | {calib} |")
    lines += ["", "## Goals", ""]
    for text, met, detail in goals(rows):
        status = "not measured" if met is None else ("met" if met else "NOT met")
        lines.append(f"- {text}: **{status}**" + (f" ({detail})" if met is not None else ""))
    lines += ["", f"Machine: {meta['machine']}", ""]
    return "\n".join(lines)


def load_previous(path: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier run with the same settings (so runs in pieces add up)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    same = all(old.get("meta", {}).get(k) == meta[k] for k in ("windows", "ctx", "eval_text", "calib_text"))
    return [r for r in old.get("rows", []) if r.get("row") in ROW_BY_KEY] if same else []


def write(out_dir: Path, stem: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    order = {k: i for i, k in enumerate(ROW_BY_KEY)}
    rows = with_deltas(sorted(rows, key=lambda r: order[r["row"]]))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = render(meta, rows)
    (out_dir / f"{stem}.md").write_text(table)
    goal_list = [{"goal": t, "met": m, "detail": d} for t, m, d in goals(rows)]
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "goals": goal_list}, indent=2) + "\n")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--rows", nargs="+", choices=list(ROW_BY_KEY), metavar="ROW",
                   help=f"rows to measure (default all): {', '.join(ROW_BY_KEY).replace('%', '%%')}")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--smoke", action="store_true", help="2 windows of 128 tokens, fp32 + rtn-int4")
    p.add_argument("--target", default="reference", help="compile and evaluate on this target (e.g. tvm-llvm)")
    p.add_argument("--calib-sequences", type=int, help="calibration sequences of 512 tokens (default 64)")
    args = p.parse_args()
    if args.smoke:
        args.windows, args.ctx, args.rows = 2, 128, args.rows or list(SMOKE_ROWS)
    stem = "quality-smoke" if args.smoke else "quality"
    keys = args.rows or list(ROW_BY_KEY)
    extra = {} if args.calib_sequences is None else {"calib_sequences": args.calib_sequences}

    import numpy as np
    from bitsmith.frontend.models import load_pretrained

    model, tokenizer = load_pretrained(MODEL)
    text = EVAL_TEXT.read_text(encoding="utf-8")
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    meta = {"model": MODEL, "eval_text": f"../shared/data/text/{EVAL_TEXT.name}",
            "calib_text": f"../shared/data/text/{CALIB_TEXT.name}", "windows": args.windows,
            "ctx": args.ctx, "group_size": GROUP_SIZE, "text_tokens": int(len(ids)), "machine": machine_line()}
    done = {r["row"]: r for r in load_previous(args.out_dir / f"{stem}.json", meta)}
    for key in keys:
        print(f"[{key}] compiling and scoring {args.windows} x {args.ctx} tokens...", file=sys.stderr, flush=True)
        row = measure(ROW_BY_KEY[key], model, tokenizer, ids, args.ctx, args.windows, args.target, extra)
        print(f"[{key}] ppl {row['ppl']:.3f}, {row['bits_per_weight']} bits/weight, quantize "
              f"{row['quantize_seconds']:.1f}s, eval {row['eval_seconds']:.1f}s", file=sys.stderr, flush=True)
        done[key] = row
        write(args.out_dir, stem, meta, list(done.values()))  # a partial run still leaves a table
    print(write(args.out_dir, stem, meta, list(done.values())))


if __name__ == "__main__":
    main()
