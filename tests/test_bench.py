"""``bitsmith bench`` and ``bitsmith.bench.run_bench`` on the tiny Llama of hf_configs (reference).

No timing is asserted: the checks are the table's shape, the JSON's internal consistency
(tokens / seconds, mean over the repetitions), what was run (call counts, prompt, greedy
tokens against ``generate``) and the errors.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

import bitsmith
from artifact_helpers import compiled
from bitsmith.bench import run_bench
from bitsmith.cli import main
from bitsmith.runtime import CompiledModel

PROMPT, GEN, REPS = 8, 4, 2


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, object]:
    pytest.importorskip("transformers")
    from bitsmith.testing.hf_configs import make_model
    model = make_model("llama")
    path = tmp_path_factory.mktemp("bench") / "llama"
    bitsmith.compile(model, target="reference").save(str(path))
    return path, model


def bench_args(path: Path, *extra: str) -> list[str]:
    return ["bench", str(path), "--prompt-tokens", str(PROMPT), "--gen-tokens", str(GEN),
            "--repetitions", str(REPS), *extra]


def test_table_has_llama_bench_rows_and_columns(capsys, llama):
    path, model = llama
    code, out, err = run_cli(capsys, *bench_args(path))
    assert code == 0, err
    lines = out.splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[:4]]
    assert cells[0] == ["model", "size", "params", "target", "threads", "test", "t/s"]
    assert set("".join(cells[1])) <= set("- ")
    assert [row[5] for row in cells[2:4]] == [f"pp{PROMPT}", f"tg{GEN}"]
    tensors = bitsmith.load(str(path)).module.tensors
    size_mib = sum(tensors[n].nbytes for n in tensors) / 2**20
    for row in cells[2:4]:
        assert row[3] == "reference"
        assert row[1] == f"{size_mib:.2f} MiB"
        # fp32, no quantized layer: the IR stores each torch parameter once (embeddings tied)
        assert row[2] == f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"
        mean, std = (float(x) for x in row[6].split("±"))
        assert mean > 0 and std >= 0
    assert any(line.startswith("machine: ") for line in lines[4:])
    assert any(line.startswith(f"time to first token (pp{PROMPT}): ") for line in lines[4:])


def test_json_is_the_only_stdout_and_consistent(capsys, llama):
    path, _ = llama
    code, out, err = run_cli(capsys, *bench_args(path, "--json"))
    assert code == 0, err
    doc = json.loads(out)  # the whole of stdout is one JSON document
    assert (doc["prompt_tokens"], doc["gen_tokens"], doc["repetitions"]) == (PROMPT, GEN, REPS)
    for key, tokens, seconds in (("prefill_tokens_per_second", PROMPT, "prefill_seconds"),
                                 ("decode_tokens_per_second", GEN, "decode_seconds")):
        rates, times = doc[key]["values"], doc[seconds]["values"]
        assert len(rates) == len(times) == REPS
        assert all(t > 0 for t in times)
        assert rates == pytest.approx([tokens / t for t in times], rel=1e-12)  # float division only
        assert doc[key]["mean"] == pytest.approx(statistics.fmean(rates), rel=1e-12)
        assert doc[key]["std"] == pytest.approx(statistics.stdev(rates), rel=1e-12)
    ttft = doc["time_to_first_token_seconds"]["values"]
    # the first token needs the whole prefill call, timed inside the time to first token
    assert all(t >= p for t, p in zip(ttft, doc["prefill_seconds"]["values"]))
    assert doc["peak_rss_bytes"] > 0
    assert doc["target"] == "reference" and doc["machine"]["cores"] >= 1


def test_runs_warm_up_plus_repetitions_of_prefill_and_greedy_decode(llama, monkeypatch):
    path, _ = llama
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    original = CompiledModel.run

    def counting(self, function, args):
        calls.append((np.array(args[0]), np.array(args[1])))
        return original(self, function, args)

    monkeypatch.setattr(CompiledModel, "run", counting)
    result = run_bench(str(path), prompt_tokens=PROMPT, gen_tokens=GEN, repetitions=3, seed=7)
    monkeypatch.undo()
    assert result.repetitions == 3 and len(result.decode_seconds.values) == 3
    assert len(calls) == (1 + 3) * (1 + GEN)  # one warm-up, then each repetition
    prompt = calls[0][0]
    assert prompt.shape == (1, PROMPT)
    vocab = bitsmith.load(str(path)).module.attr("vocab_size")
    expected = np.random.default_rng(7).integers(0, vocab, size=(1, PROMPT), dtype=np.int64)
    np.testing.assert_array_equal(prompt, expected)  # seeded synthetic ids over the vocabulary
    greedy = np.asarray(bitsmith.load(str(path)).generate(prompt, max_new_tokens=GEN))[0, PROMPT:]
    for run in range(4):
        ids, pos = zip(*calls[run * (1 + GEN):(run + 1) * (1 + GEN)])
        np.testing.assert_array_equal(ids[0], prompt)
        np.testing.assert_array_equal(pos[0], np.arange(PROMPT)[None])
        # decode steps feed back the greedy tokens, one position at a time
        assert [int(x[0, 0]) for x in ids[1:]] == [int(t) for t in greedy]
        assert [int(p[0, 0]) for p in pos[1:]] == list(range(PROMPT, PROMPT + GEN))


@pytest.mark.parametrize("extra, words", [
    (["--prompt-tokens", "300"], "exceed the model's context of 256 positions"),
    (["--gen-tokens", "0"], "gen tokens must be a positive integer, got 0"),
    (["--repetitions", "-1"], "repetitions must be a positive integer, got -1"),
    (["--prompt-tokens", "0"], "prompt tokens must be a positive integer, got 0"),
    (["--threads", "-1"], "threads must be a non-negative integer (0: every CPU), got -1"),
])
def test_bad_counts_are_one_line_errors(capsys, llama, extra, words):
    code, out, err = run_cli(capsys, "bench", str(llama[0]), *extra)
    assert_one_line_error(code, out, err, words)


def test_missing_dir_and_non_language_model_are_one_line_errors(capsys, tmp_path):
    code, out, err = run_cli(capsys, "bench", str(tmp_path / "nope"))
    assert_one_line_error(code, out, err, "no such artifact directory")
    compiled().save(tmp_path / "plain")
    code, out, err = run_cli(capsys, "bench", str(tmp_path / "plain"), "--prompt-tokens", "4")
    assert_one_line_error(code, out, err, "measures language models only")


def assert_one_line_error(code: int, out: str, err: str, words: str) -> None:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitsmith: error: "), err
    assert words in lines[0], err


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_size_the_tvm_pool(tmp_path, threads):
    """--threads reaches the TVM pool: in a fresh process (the command line's case) the pool the
    runs used has exactly that many threads, also where TVM's own default differs."""
    import os
    import subprocess
    import sys
    pytest.importorskip("tvm")
    if len(os.sched_getaffinity(0)) < threads:
        pytest.skip(f"needs {threads} usable CPUs")
    from bitsmith.testing.hf_configs import make_model
    bitsmith.compile(make_model("llama"), target="tvm-llvm").save(str(tmp_path / "tvm"))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-m", "bitsmith", "bench", str(tmp_path / "tvm"), "--json",
                          "--prompt-tokens", "4", "--gen-tokens", "2", "--repetitions", "1",
                          "--threads", str(threads)],
                         env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["threads_effective"] == threads


def test_run_bench_imports_neither_frontend_nor_passes(llama):
    import subprocess
    import sys
    code = ("import sys; from bitsmith.bench import run_bench; "
            f"run_bench({str(llama[0])!r}, prompt_tokens=2, gen_tokens=1, repetitions=1); "
            "print(sorted(m for m in sys.modules if m.startswith(('bitsmith.frontend', 'bitsmith.passes'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
