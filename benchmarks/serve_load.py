"""Load test of ``bitsmith serve``: concurrent streaming clients against one server, checked.

Usage (build the artifact once; the server runs as a subprocess so its RSS is its own):

    python -m bitsmith compile smollm2-135m --target tvm-llvm --out /tmp/smol
    python benchmarks/serve_load.py /tmp/smol [--requests 500 --clients 32 --bad 200]

Phases (every request greedy, ``temperature`` 0, streamed with ``include_usage``):

1. alone: each of ``--distinct`` requests (mixed prompt lengths and ``max_tokens``, a quarter
   of them chat) is served with nothing else in flight. These replies are the oracle, and
   their time to first token (TTFT) and tokens/s are the sequential-serving baseline.
2. load: ``--requests`` requests drawn from those, ``--clients`` concurrent clients. Every reply
   must equal the same request's reply alone; any error, non-200 or mismatch is a failure.
3. abuse: ``--bad`` malformed requests (broken JSON, wrong types, unsupported or out-of-range
   values, prompts over the context, ...) interleaved with good ones: every bad one must get a
   4xx with an OpenAI error body, every good one its alone reply; the server's VmRSS
   (/proc/PID/status) is read before and after.

Prints a markdown table (and ``--json OUT``). Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_line  # noqa: E402

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "sensesensibility.txt"
FALLBACK_TEXT = ("It is a truth universally acknowledged that a single man in possession of a good fortune "
                 "must be in want of a wife. ") * 40


@dataclass
class Outcome:
    status: int = 0
    text: str = ""
    ttft: float | None = None
    latency: float = 0.0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Report:
    machine: str
    settings: dict[str, Any]
    alone: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    abuse: dict[str, Any] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.load.get("failed", 1) == 0 and self.load.get("mismatched", 1) == 0
                and self.abuse.get("bad_not_4xx", 1) == 0 and self.abuse.get("good_failed", 1) == 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads): throughput per server CPU
    second does not depend on how busy the rest of a shared machine is, as wall time does."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(artifact: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bitsmith", "serve", artifact, "--port", str(port), "--model-id", "m",
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--timeout", str(args.timeout)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    import httpx
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in time")


def distinct_requests(n: int, seed: int, max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) pairs: prompts of 2..64 words cut from a text, max_tokens 1..``max_tokens``,
    every fourth a chat request."""
    words = (TEXT.read_text(encoding="utf-8") if TEXT.exists() else FALLBACK_TEXT).split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([2, 4, 8, 16, 32, 64])
        start = rng.randrange(0, len(words) - length)
        text = " ".join(words[start:start + length])
        body: dict[str, Any] = {"model": "m", "max_tokens": rng.randint(1, max_tokens), "temperature": 0,
                                "stream": True, "stream_options": {"include_usage": True}}
        if i % 4 == 3:
            out.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}))
        else:
            out.append(("/v1/completions", {**body, "prompt": text}))
    return out


def bad_requests(n: int) -> list[tuple[str, bytes]]:
    """``n`` malformed (path, raw body) pairs cycling through every kind of mistake."""
    too_long = " ".join(["word"] * 9000)
    kinds: list[tuple[str, Any]] = [
        ("/v1/completions", b"{\"prompt\": \"hi\", "),
        ("/v1/completions", b"\xff\xfe not utf-8"),
        ("/v1/completions", b"[\"a list\"]"),
        ("/v1/completions", b""),
        ("/v1/completions", {"prompt": 17}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 12}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}),
        ("/v1/completions", {"prompt": "hi", "n": 3}),
        ("/v1/completions", {"prompt": "hi", "logprobs": 5}),
        ("/v1/completions", {"prompt": "hi", "stop": {"a": 1}}),
        ("/v1/completions", {"prompt": [10 ** 9]}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": too_long}),
        ("/v1/completions", {"prompt": "hi", "model": "not-this-one"}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1.0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}),
    ]
    out = []
    for i in range(n):
        path, body = kinds[i % len(kinds)]
        out.append((path, body if isinstance(body, bytes) else json.dumps(body).encode()))
    return out


async def stream_one(client: Any, url: str, path: str, body: dict[str, Any]) -> Outcome:
    out, t0 = Outcome(), time.perf_counter()
    try:
        async with client.stream("POST", url + path, json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = (await r.aread()).decode(errors="replace")[:300]
                return out
            pieces = []
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    out.completion_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
                    if piece:
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - t0
                        pieces.append(piece)
            out.text = "".join(pieces)
    except Exception as e:  # a failed request is counted, never fatal
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - t0
    if out.ttft is None:
        out.ttft = out.latency  # an empty reply's first (and only) event is its end
    return out


async def post_raw(client: Any, url: str, path: str, raw: bytes) -> tuple[int, Any]:
    try:
        r = await client.post(url + path, content=raw, headers={"content-type": "application/json"})
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, None
    except Exception as e:
        return -1, f"{type(e).__name__}: {e}"


async def pool(jobs: list[Any], workers: int, run: Any, deadline: float) -> list[Any]:
    """Runs ``run(job)`` over ``jobs`` with ``workers`` concurrent workers; jobs not started by
    ``deadline`` (time.monotonic) are skipped (None)."""
    results: list[Any] = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            i = queue.get_nowait()
            results[i] = await run(jobs[i])
    await asyncio.gather(*(worker() for _ in range(workers)))
    return results


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))] if s else float("nan")


async def run_load(url: str, pid: int, args: argparse.Namespace) -> Report:
    import httpx

    report = Report(machine_line(), {k: v for k, v in vars(args).items() if k != "artifact"})
    deadline = time.monotonic() + args.time_limit
    timeout = httpx.Timeout(args.timeout + 60)
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        report.rss_mib["after_load"] = vm_rss(pid) / 2**20
        distinct = distinct_requests(args.distinct, args.seed, args.max_tokens)
        # 1. alone: the oracle and the sequential baseline
        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        alone = [await stream_one(client, url, p, b) for p, b in distinct]
        alone_cpu = cpu_seconds(pid) - cpu0
        bad_alone = [i for i, o in enumerate(alone) if o.status != 200 or o.error]
        if bad_alone:
            raise RuntimeError(f"requests failed when served alone: {[alone[i].error for i in bad_alone][:3]}")
        rng = random.Random(args.seed + 1)
        picks = [rng.randrange(len(distinct)) for _ in range(args.requests)]
        seq_seconds = sum(alone[i].latency for i in picks)     # serving the same requests one by one
        seq_tokens = sum(alone[i].completion_tokens for i in picks)
        alone_tokens = sum(o.completion_tokens for o in alone)
        report.alone = {"requests": len(distinct), "seconds": time.perf_counter() - t0,
                        "server_cpu_seconds": alone_cpu, "completion_tokens": alone_tokens,
                        "tokens_per_server_cpu_s": alone_tokens / alone_cpu,
                        "ttft_p50_s": percentile([alone[i].ttft for i in picks], 50),
                        "ttft_p99_s": percentile([alone[i].ttft for i in picks], 99),
                        "sequential_tokens_per_s": seq_tokens / seq_seconds,
                        "sequential_seconds_for_the_load": seq_seconds}
        report.rss_mib["after_alone"] = vm_rss(pid) / 2**20

        # 2. load: concurrent streaming clients
        t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
        outcomes = await pool(picks, args.clients, lambda i: stream_one(client, url, *distinct[i]), deadline)
        wall, load_cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        done = [(i, o) for i, o in zip(picks, outcomes) if o is not None]
        failed = [o for _, o in done if o.status != 200 or o.error]
        mismatched = [i for i, o in done if not (o.status != 200 or o.error) and o.text != alone[i].text]
        tokens = sum(o.completion_tokens for _, o in done)
        report.load = {"requests": len(done), "skipped_by_time_limit": args.requests - len(done),
                       "failed": len(failed), "mismatched": len(mismatched), "seconds": wall,
                       "completion_tokens": tokens, "tokens_per_s": tokens / wall,
                       "server_cpu_seconds": load_cpu, "tokens_per_server_cpu_s": tokens / load_cpu,
                       "ttft_p50_s": percentile([o.ttft for _, o in done], 50),
                       "ttft_p99_s": percentile([o.ttft for _, o in done], 99),
                       "first_failures": [o.error for o in failed[:3]]}
        report.rss_mib["before_abuse"] = vm_rss(pid) / 2**20

        # 3. abuse: malformed requests interleaved with good ones
        bad = bad_requests(args.bad)
        mixed: list[tuple[str, Any]] = []
        for j, item in enumerate(bad):
            mixed.append(("bad", item))
            if j % args.good_every == 0:
                mixed.append(("good", rng.randrange(len(distinct))))

        async def run_mixed(job: tuple[str, Any]) -> tuple[str, Any, Any]:
            kind, item = job
            if kind == "bad":
                return kind, item, await post_raw(client, url, *item)
            return kind, item, await stream_one(client, url, *distinct[item])
        results = await pool(mixed, args.clients, run_mixed, deadline + args.time_limit)
        bad_not_4xx = [(s, b) for k, _, (s, b) in ((k, i, r) for k, i, r in results if k == "bad")
                       if not (400 <= s < 500 and isinstance(b, dict) and set(b.get("error", {})) >= {"message", "type"})]
        good = [(i, o) for k, i, o in results if k == "good"]
        good_failed = [o for i, o in good if o.status != 200 or o.error or o.text != alone[i].text]
        report.abuse = {"bad": sum(k == "bad" for k, _, _ in results), "bad_not_4xx": len(bad_not_4xx),
                        "good": len(good), "good_failed": len(good_failed),
                        "statuses": sorted({s for k, _, (s, _b) in ((k, i, r) for k, i, r in results if k == "bad")}),
                        "first_problems": [str(x)[:200] for x in (bad_not_4xx[:2] + [o.error for o in good_failed[:2]])]}
        report.rss_mib["after_abuse"] = vm_rss(pid) / 2**20
    return report


def table(r: Report) -> str:
    a, ld, ab, m = r.alone, r.load, r.abuse, r.rss_mib
    lines = [
        f"machine: {r.machine}",
        f"settings: {json.dumps(r.settings)}",
        "",
        "| serving | requests | tokens/s (wall) | tokens per server CPU s | TTFT p50 (s) | TTFT p99 (s) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| sequential (each request alone) | {ld['requests']} | {a['sequential_tokens_per_s']:.2f} | "
        f"{a['tokens_per_server_cpu_s']:.2f} | {a['ttft_p50_s']:.3f} | {a['ttft_p99_s']:.3f} | "
        f"{a['sequential_seconds_for_the_load']:.1f} (sum of alone) |",
        f"| continuous batching, {r.settings['clients']} clients | {ld['requests']} | {ld['tokens_per_s']:.2f} | "
        f"{ld['tokens_per_server_cpu_s']:.2f} | {ld['ttft_p50_s']:.3f} | {ld['ttft_p99_s']:.3f} | {ld['seconds']:.1f} |",
        "",
        f"throughput ratio (batched / sequential): wall {ld['tokens_per_s'] / a['sequential_tokens_per_s']:.2f}x, "
        f"per server CPU second {ld['tokens_per_server_cpu_s'] / a['tokens_per_server_cpu_s']:.2f}x; "
        f"failed {ld['failed']}, not equal to alone {ld['mismatched']}, skipped by time limit "
        f"{ld['skipped_by_time_limit']}",
        f"abuse: {ab['bad']} malformed -> {ab['bad'] - ab['bad_not_4xx']} got a 4xx OpenAI error "
        f"(statuses {ab['statuses']}); {ab['good']} good interleaved -> {ab['good'] - ab['good_failed']} correct",
        "server VmRSS (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", help="an artifact directory of a causal LM (e.g. SmolLM2 on tvm-llvm)")
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--distinct", type=int, default=32, help="distinct requests the load is drawn from")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens drawn from 1..N")
    p.add_argument("--bad", type=int, default=200)
    p.add_argument("--good-every", type=int, default=4, help="one good request after every N bad ones")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1800.0, help="the server's per-request timeout")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=1800.0,
                   help="seconds after which the load phase starts no new request (reported as skipped)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    port = free_port()
    proc = start_server(args.artifact, port, args)
    try:
        report = asyncio.run(run_load(f"http://127.0.0.1:{port}", proc.pid, args))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main().ok else 1)
