"""Attention offloading end to end: an artifact compiled with offload_attention=True generates
the same greedy tokens as the plain compile, in one process and with 1 or 2 attention workers
over torch.distributed (separate processes on loopback); the bytes rank 0 moves equal the pass's
prediction; a dead or stuck worker ends the run with an error naming its rank, never a hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.passes import PassManager
from bitsmith.passes.offload_attention import offload_report
from bitsmith.runtime.offload.launch import load_offloaded
from bitsmith.testing.hf_configs import make_model
from offload_rank0 import child_env, run_rank0

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 3, 99, 42], [1, 2, 3, 4, 5]]  # a batch of 2 (stagger needs at least 2 rows)
NEW = 8


_env = child_env


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: (plain reference CompiledModel, offloaded artifact dir)}, compiled lazily."""
    cache: dict[str, tuple[object, Path]] = {}

    def get(arch: str, target: str = "reference"):
        if (arch, target) not in cache:
            model = make_model(arch)
            plain = bitsmith.compile(model, target=target)
            off = bitsmith.compile(model, target=target, offload_attention=True)
            path = tmp_path_factory.mktemp(f"{arch}-{target}") / "art"
            off.save(path)
            cache[(arch, target)] = (plain, path, off)
        return cache[(arch, target)]
    return get


def rank0(path: Path, workers: int, stagger: bool, tmp: Path, loads: int = 1):
    return run_rank0(path, workers, stagger, PROMPTS, NEW, tmp / f"out-{workers}-{int(stagger)}.npz", timeout=300,
                     loads=loads)


def predicted_bytes(plain, batch: int, seqs: list[int]) -> tuple[int, int]:
    """What the pass predicts rank 0 sends / receives over forwards of these lengths."""
    split = PassManager("drop-attention-mask,offload_attention").run(plain.module)
    reports = [offload_report(split, {"batch": batch, "seq": s}) for s in seqs]
    return sum(r.sent for r in reports), sum(r.received for r in reports)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_single_process_equals_plain(compiled, arch):
    plain, path, off = compiled(arch)
    ids = np.asarray(PROMPTS)
    tol = backend_for_target("reference").tolerance("reference", {})
    want = np.asarray(plain.generate(ids, NEW))
    for model in (off, load_offloaded(str(path), stagger=True)):
        np.testing.assert_array_equal(np.asarray(model.generate(ids, NEW)), want)
        assert tol.mismatch(np.asarray(model(ids)), np.asarray(plain(ids))) is None


def test_workers_match_and_bytes_equal_prediction(compiled, tmp_path):
    """Two workers (a 1 + 1 split of tiny Llama's 2 kv heads), staggered micro-batches."""
    plain, path, _ = compiled("llama")
    tokens, logits, stats = rank0(path, 2, True, tmp=tmp_path)
    ids = np.asarray(PROMPTS)
    np.testing.assert_array_equal(tokens, np.asarray(plain.generate(ids, NEW)))
    assert backend_for_target("reference").tolerance("reference", {}).mismatch(logits, np.asarray(plain(ids))) is None
    n = len(PROMPTS[0])
    # forwards: the logits call (seq n), then generate's prefill (n) and NEW - 1 decode steps
    sent, received = predicted_bytes(plain, len(PROMPTS), [n, n] + [1] * (NEW - 1))
    assert (stats["bytes_sent"], stats["bytes_received"]) == (sent, received)
    assert stats["heads"] == [[0, 1], [1, 2]]


@pytest.mark.slow  # two loads, each starting a worker
def test_second_load_in_one_process(compiled, tmp_path):
    """Loading, closing and loading again in one process starts fresh workers (the first load
    must leave no torchrun-like environment or process group behind)."""
    plain, path, _ = compiled("llama")
    tokens, _, stats = rank0(path, 1, False, tmp=tmp_path, loads=2)
    np.testing.assert_array_equal(tokens, np.asarray(plain.generate(np.asarray(PROMPTS), NEW)))
    assert stats["workers"] == 1


@pytest.mark.slow  # six runs of 2-3 processes each: ~2 min on a shared 2-core machine
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("workers", [1, 2])
def test_workers_equal_single_process(compiled, arch, workers, tmp_path):
    plain, path, _ = compiled(arch)
    tokens, logits, stats = rank0(path, workers, False, tmp=tmp_path)
    ids = np.asarray(PROMPTS)
    np.testing.assert_array_equal(tokens, np.asarray(plain.generate(ids, NEW)))
    assert backend_for_target("reference").tolerance("reference", {}).mismatch(logits, np.asarray(plain(ids))) is None
    n = len(PROMPTS[0])
    assert (stats["bytes_sent"], stats["bytes_received"]) == predicted_bytes(plain, 2, [n, n] + [1] * (NEW - 1))


def _child_with_rank(parent: int, rank: str) -> int:
    """The pid of ``parent``'s child process whose environment says RANK=rank (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry.name)
    raise AssertionError(f"no child of {parent} with RANK={rank}")


def _run_and_break(path: Path, how: int, timeout: float) -> tuple[int, str, float]:
    """Starts `bitsmith run --attention-workers 2`, waits for the first generated text, sends
    ``how`` to the worker of rank 2, and returns (exit code, stderr, seconds rank 0 took after)."""
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith", "run", str(path), "--prompt", "w5 w7 w9",
                             "--max-new-tokens", "240", "--attention-workers", "2", "--offload-timeout", str(timeout)],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.read(2)  # generation is under way: both workers joined and answer
        victim = _child_with_rank(proc.pid, "2")
        os.kill(victim, how)
        start = time.monotonic()
        code = proc.wait(timeout=timeout + 60)
        took = time.monotonic() - start
        if how == signal.SIGSTOP:  # rank 0 reaps the workers it started; this one may be gone already
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code, proc.stderr.read().decode(), took
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def tiny_llama_artifact(tmp_path_factory) -> Path:
    from tiny_llama import save_tiny_llama
    hf = save_tiny_llama(tmp_path_factory.mktemp("hf"))
    path = tmp_path_factory.mktemp("off") / "art"
    bitsmith.compile(str(hf), target="reference", offload_attention=True).save(path)
    return path


def test_killed_worker_ends_run_naming_rank(tiny_llama_artifact):
    code, err, took = _run_and_break(tiny_llama_artifact, signal.SIGKILL, timeout=30.0)
    assert code != 0 and "rank 2" in err, err
    assert took < 30.0 + 15  # a dead peer is seen at once (connection reset); never the full timeout


@pytest.mark.slow  # waits out the timeout
def test_stuck_worker_times_out_naming_rank(tiny_llama_artifact):
    code, err, took = _run_and_break(tiny_llama_artifact, signal.SIGSTOP, timeout=5.0)
    assert code != 0 and "rank 2" in err and "timeout 5" in err, err
    assert took < 5.0 + 30


def test_cli_compile_and_run_flags(tiny_llama_artifact, tmp_path, capsys):
    from bitsmith.cli import main
    assert main(["run", str(tiny_llama_artifact), "--prompt", "w5 w7", "--max-new-tokens", "3",
                 "--attention-workers", "3"]) == 2
    assert "between 1 and the model's 2 kv heads" in capsys.readouterr().err
    assert main(["compile", "x", "--target", "reference", "--attention-target", "reference",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--attention-target needs --offload-attention" in capsys.readouterr().err
    assert main(["run", str(tiny_llama_artifact), "--prompt", "w5 w7", "--max-new-tokens", "3", "--stagger"]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    manifest = json.loads((tiny_llama_artifact / "offload.json").read_text())
    assert (manifest["dense"]["target"], manifest["attention"]["target"]) == ("reference", "reference")
    assert manifest["transfer_bytes_per_token"]["sent"] == 2 * 4 * 16 * (4 + 2 + 2)  # 2 layers, q + k + v


@pytest.mark.slow  # torchrun starts 3 processes
def test_torchrun_equals_single_process(tiny_llama_artifact):
    def run(*launcher: str) -> str:
        cmd = [*launcher, "-m", "bitsmith", "run", str(tiny_llama_artifact), "--prompt", "w5 w7 w9",
               "--max-new-tokens", "12"]
        return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, check=True,
                              timeout=300).stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "3"]
    assert run(*torchrun) == run(sys.executable)


@pytest.mark.slow  # tvm-llvm compiles of both sides for three models
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_tvm_llvm_sides_within_tolerance_of_the_oracle(compiled, arch, tmp_path):
    oracle, _, _ = compiled(arch)
    plain, path, off = compiled(arch, "tvm-llvm")
    ids = np.asarray(PROMPTS)
    tol = backend_for_target("tvm-llvm").tolerance("tvm-llvm", {})
    assert tol.mismatch(np.asarray(off(ids)), np.asarray(oracle(ids))) is None
    want = np.asarray(plain.generate(ids, NEW))
    np.testing.assert_array_equal(np.asarray(off.generate(ids, NEW)), want)
    tokens, logits, _ = run_rank0(path, 2, True, PROMPTS, NEW, tmp_path / "w2.npz", timeout=300)
    np.testing.assert_array_equal(tokens, want)
    assert tol.mismatch(logits, np.asarray(oracle(ids))) is None
