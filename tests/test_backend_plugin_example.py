"""examples/backend-plugin installed as a user would: pip into a fresh venv, then a model
compiled for its target toy-numpy, saved, loaded and run against the reference target, and
the plugin's own tests (the conformance suite) run there.

The venv reuses this environment's packages (torch, transformers, pip, setuptools) through a
.pth file, and this checkout's bitsmith, so nothing is downloaded: pip builds the plugin from
its directory with --no-index --no-build-isolation.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "backend-plugin"

IN_VENV = r'''
import json, sys, tempfile
from pathlib import Path
import numpy as np
import bitsmith
from bitsmith.backends import backend_for_target
from bitsmith.testing.hf_configs import VOCAB, make_model
import toy_backend

backend = backend_for_target("toy-numpy")
model = make_model("llama")
ref = bitsmith.compile(model, "reference")
toy = bitsmith.compile(model, "toy-numpy")
where = Path(tempfile.mkdtemp()) / "toy-artifact"
toy.save(str(where))
loaded = bitsmith.load(str(where))
ids = np.random.default_rng(0).integers(0, VOCAB, (2, 6))
want = np.asarray(ref(ids))
got = np.asarray(loaded(ids))
tol = backend.tolerance("toy-numpy", {})
print(json.dumps({
    "plugin_file": toy_backend.__file__, "backend": type(backend).__module__,
    "files": sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file()),
    "steps": loaded.report()["executable"]["steps"],
    "mismatch": tol.mismatch(got, want), "max_abs": float(np.abs(got - want).max()),
    "same_tokens": bool(np.array_equal(np.asarray(loaded.generate(ids[:1], 6)), np.asarray(ref.generate(ids[:1], 6)))),
}))
'''


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_example_plugin_installs_and_runs_a_model_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    py = str(venv / "bin" / "python")
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (purelib / "bitsmith-parent-env.pth").write_text("\n".join([str(REPO), *site.getsitepackages()]) + "\n")
    src = shutil.copytree(EXAMPLE, tmp_path / "backend-plugin",
                          ignore=shutil.ignore_patterns(".hypothesis", "build", "*.egg-info", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", BITSMITH_CACHE_DIR=str(tmp_path / "cache"),
               BITSMITH_TRUST_STORE=str(tmp_path / "trust.json"))
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--quiet", str(src)],
         env=env, cwd=tmp_path)

    listed = _run([py, "-m", "bitsmith", "targets"], env=env, cwd=tmp_path).stdout.splitlines()
    assert any(line.split() == ["toy-numpy", "toy"] for line in listed), listed

    result = json.loads(_run([py, "-c", IN_VENV], env=env, cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert result["plugin_file"].startswith(str(purelib)) and result["backend"] == "toy_backend"
    assert "target/schedule.json" in result["files"] and result["steps"] > 0
    # within the tolerance ToyBackend declares (float32 kernels against a float64-summing oracle)
    assert result["mismatch"] is None, result
    assert result["same_tokens"], result
    print(f"toy-numpy vs reference, tiny llama logits: max |diff| {result['max_abs']:.3g}")

    tests = _run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], env=env, cwd=src)
    assert " passed" in tests.stdout and "failed" not in tests.stdout, tests.stdout[-2000:]
