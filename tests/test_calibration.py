"""Calibration statistics (bitsmith.passes.quantization.calibration) against torch forward hooks
on the same Hugging Face model, window slicing, and TextCalibration's tokenizing and caching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith.passes.quantization import calibration
from bitsmith.passes.quantization.calibration import (TextCalibration, calibration_windows, collect_statistics,
                                                      linear_inputs)

from bitsmith.testing.hf_configs import VOCAB, make_model


@pytest.fixture(scope="module")
def llama():
    model = make_model("llama")
    return model, bitsmith.compile(model).module


def hooked_statistics(model: torch.nn.Module, windows: list[np.ndarray]) -> dict[str, tuple[np.ndarray, int]]:
    """Σ xᵀx (float64) and token count of every nn.Linear's input, by module path, from torch."""
    sums: dict[str, list] = {}

    def hook(name):
        def record(mod, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            entry = sums.setdefault(name, [0.0, 0])
            entry[0] = entry[0] + (x.T @ x).numpy()
            entry[1] += x.shape[0]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for ids in windows:
                model(torch.from_numpy(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (total, count) for name, (total, count) in sums.items()}


def test_statistics_equal_torch_hooks(llama):
    model, module = llama
    rng = np.random.default_rng(0)
    windows = calibration_windows(rng.integers(0, VOCAB, size=3 * 40 + 7), sequences=8, length=40)
    assert len(windows) == 3
    stats = collect_statistics(module, windows)
    want = hooked_statistics(model, windows)

    fn = module.function("main")
    layers = [n for n in fn.nodes if n.op == "linear"]
    assert len(layers) == len(want) == 15  # 7 per decoder layer + lm_head
    assert len(stats) == 9  # q/k/v and gate/up share their input: one entry each
    for node in layers:
        got = stats[node.inputs[0]]
        total, tokens = want[node.loc.module_path]
        assert got.tokens == tokens == 3 * 40
        # The interpreter and torch compute the float32 forward in different op orders (~1e-6
        # relative), and the Gram matrix is accumulated from float32 products per window:
        # 1e-4 of the largest entry bounds both with a wide margin.
        np.testing.assert_allclose(got.hessian, total / tokens, rtol=0, atol=1e-4 * np.abs(total / tokens).max())
        np.testing.assert_allclose(got.column_norms, np.sqrt(np.diag(total)), rtol=1e-4)
        assert not got.hessian.flags.writeable


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.integers(1, 10), st.integers(1, 40))
def test_calibration_windows_are_the_first_non_overlapping_slices(count, sequences, length):
    ids = np.arange(count) * 7 % 1000
    if count < length:
        with pytest.raises(ValueError, match="fewer than one window"):
            calibration_windows(ids, sequences, length)
        return
    windows = calibration_windows(ids, sequences, length)
    assert len(windows) == min(sequences, count // length)
    for i, window in enumerate(windows):
        assert window.shape == (1, length) and window.dtype == np.int64
        np.testing.assert_array_equal(window[0], ids[i * length:(i + 1) * length])


def test_calibration_windows_rejects_bad_sizes():
    with pytest.raises(ValueError):
        calibration_windows(np.arange(10), sequences=0, length=2)
    with pytest.raises(ValueError):
        calibration_windows(np.arange(10), sequences=1, length=0)


def word_tokenizer_json(words: list[str]) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def test_text_calibration_tokenizes_and_caches(llama, tmp_path, monkeypatch):
    model, module = llama
    words = [f"w{i}" for i in range(VOCAB - 1)]
    rng = np.random.default_rng(1)
    ids = rng.integers(1, VOCAB, size=100)
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words[i - 1] for i in ids), encoding="utf-8")
    calls = []
    real = calibration.collect_statistics
    monkeypatch.setattr(calibration, "collect_statistics",
                        lambda m, windows, progress=False, runner=None: calls.append(windows) or real(m, windows, runner=runner))

    calib = TextCalibration(str(text), word_tokenizer_json(words), sequences=4, length=24)
    assert "tokenizer" not in repr(calib)
    first = calib(module)
    assert len(calls) == 1 and len(calls[0]) == 4
    np.testing.assert_array_equal(np.concatenate(calls[0], axis=1)[0], ids[:96])
    assert set(first) == set(linear_inputs(module))

    # a module whose linear weights alone differ (as after sparsify) reuses the statistics
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert q_proj in module.tensors
    rewritten = module.replace(tensors=module.tensors.with_tensors({q_proj: np.zeros_like(module.tensors[q_proj])}))
    assert calib(module) is first and calib(rewritten) is first
    assert len(calls) == 1

    # anything else that shapes the activations does not
    norm = "model.norm.weight"
    changed = module.replace(tensors=module.tensors.with_tensors({norm: module.tensors[norm] * 2}))
    assert calib(changed) is not first
    assert len(calls) == 2
