"""Artifacts are deterministic: the same model compiled in fresh processes, with a cold, then a
warm, then another cold kernel cache, gives byte-identical artifact directories on every CPU
target (docs/artifact-format.md, "Determinism"). The second cold compile makes TVM/LLVM build
every kernel again, so nondeterministic compiler output would show."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_llama import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"reference": {}, "tvm-llvm": {}, "lut-cpu": {"quant": "bitmod-w4", "group_size": 32}}

# One fresh interpreter compiles the model for every target (imports once) and prints the
# kernel-cache counters (lut-cpu's are its host's), so the test can tell a cold compile from a warm one.
_COMPILE = """
import json, sys
import bitsmith
model, out, targets = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
counters = {}
for target, options in targets.items():
    cm = bitsmith.compile(model, target=target, **options)
    cm.save(f"{out}/{target}")
    rep = cm.report()["executable"]
    counters[target] = {k: rep.get(k, rep.get("host_" + k, 0)) for k in ("cache_hits", "cache_misses")}
print(json.dumps(counters))
"""


def _compile_all(model: Path, out: Path, cache: Path, hash_seed: str) -> dict[str, dict[str, int]]:
    # a different PYTHONHASHSEED per run changes the iteration order of every set and str-keyed
    # hash, so ordering noise shows up as a byte difference
    env = {**os.environ, "BITSMITH_CACHE_DIR": str(cache), "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(model), str(out), json.dumps(TARGETS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every entry under ``root`` (directories must be only that)."""
    out = {}
    for p in sorted(root.rglob("*")):
        assert p.is_dir() or p.is_file() and not p.is_symlink(), p
        if p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def two_compiles(tmp_path_factory) -> tuple[Path, Path, dict, dict, Path, dict]:
    """The tiny Llama saved in two different directories with the same base name (so an
    absolute model path in the artifact would show), compiled in fresh processes: first with a
    cold kernel cache, second with the cache the first one filled, third with another empty
    cache (every kernel compiled again)."""
    base = tmp_path_factory.mktemp("determinism")
    model_a = save_tiny_llama(base / "first" / "tiny-llama")
    model_b = save_tiny_llama(base / "second" / "tiny-llama")
    cache = base / "kernel-cache"
    cold = _compile_all(model_a, base / "out-a", cache, "1")
    warm = _compile_all(model_b, base / "out-b", cache, "2")
    cold2 = _compile_all(model_b, base / "out-c", base / "kernel-cache-2", "3")
    return base / "out-a", base / "out-b", cold, warm, base / "out-c", cold2


@pytest.mark.slow  # three fresh interpreters x three targets: ~2 min on 2 busy cores
@pytest.mark.parametrize("target", list(TARGETS))
def test_compiling_twice_gives_identical_artifacts(two_compiles, target):
    out_a, out_b, cold, warm, out_c, cold2 = two_compiles
    if target != "reference":  # the first and third runs compiled kernels, the second only read them
        assert cold[target]["cache_misses"] > 0 and cold2[target]["cache_misses"] > 0, (cold, cold2)
        assert warm[target]["cache_misses"] == 0 and warm[target]["cache_hits"] > 0, warm
    a = _files(out_a / target)
    for label, other in (("warm", out_b), ("second cold", out_c)):
        b = _files(other / target)
        assert sorted(a) == sorted(b)
        differing = [name for name in a if a[name] != b[name]]
        assert not differing, f"{target}: files differ between the first and the {label} compile: {differing}"


@pytest.mark.slow
def test_artifact_names_the_model_without_its_path(two_compiles):
    out_a = two_compiles[0]
    manifest = json.loads((out_a / "reference" / "manifest.json").read_text())
    assert manifest["module_attrs"]["model_name"] == "tiny-llama"
    text = (out_a / "reference" / "manifest.json").read_text()
    assert str(out_a.parent) not in text and "seconds" not in text
    for target in TARGETS:  # no file of any target holds the temporary directories' path
        for file in (out_a / target).rglob("*"):
            if file.is_file():
                assert str(out_a.parent).encode() not in file.read_bytes(), file


def test_two_saves_in_one_process_are_identical(tmp_path):
    """The fast check of the default suite: the reference target, model directories in two
    places, compiled and saved twice in this process (timings and paths would differ)."""
    import shutil

    import bitsmith
    save_tiny_llama(tmp_path / "first" / "tiny-llama")
    shutil.copytree(tmp_path / "first", tmp_path / "second")
    outs = []
    for place in ("first", "second"):
        model = tmp_path / place / "tiny-llama"
        bitsmith.compile(str(model), target="reference").save(tmp_path / f"out-{place}")
        outs.append(_files(tmp_path / f"out-{place}"))
    assert outs[0] == outs[1]
    assert str(tmp_path).encode() not in (tmp_path / "out-first" / "manifest.json").read_bytes()
