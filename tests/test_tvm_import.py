"""The tvm backend imports TVM without torch when torch is not loaded yet (tvm_ffi would import
it, ~2.5 s of CPU a compile served from the capture cache never needs); torch still imports and
exchanges tensors with TVM afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tvm")
ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import numpy as np
from bitsmith.backends import backend_for_target
backend_for_target("tvm-llvm").option_defaults("tvm-llvm")
print("tvm" in sys.modules, "torch" in sys.modules)
import torch, tvm
x = np.arange(6, dtype=np.float32).reshape(2, 3)
print(np.array_equal(torch.from_dlpack(tvm.runtime.tensor(x)).numpy(), x))
"""


def run(code: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.skipif(sys.platform == "win32", reason="tvm_ffi's torch-first import is kept on Windows")
def test_tvm_loads_without_torch_and_torch_still_works_after():
    assert run(SCRIPT) == ["True", "False", "True"]


@pytest.mark.slow
def test_torch_loaded_first_keeps_tvm_ffi_torch_support():
    out = run("import torch\n" + SCRIPT + "\nimport tvm_ffi._convert as c\nprint(c.torch is torch)")
    assert out == ["True", "True", "True", "True"]
