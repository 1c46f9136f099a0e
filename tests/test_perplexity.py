"""runtime.perplexity: the windowed protocol, against torch on the HF model and on cm(input_ids)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bitsmith  # noqa: E402
from bitsmith.runtime.perplexity import perplexity, token_nll, window_count  # noqa: E402

CTX, WINDOWS = 24, 3


@pytest.fixture(scope="module")
def tiny():
    """(HF Llama, its compiled model, token ids of 3 full windows plus a partial one)."""
    from bitsmith.testing.hf_configs import VOCAB, make_model
    model = make_model("llama")
    ids = np.random.default_rng(1).integers(0, VOCAB, CTX * WINDOWS + 7).astype(np.int64)
    return model, bitsmith.compile(model, target="reference"), ids


def torch_ppl(logits_of, ids: np.ndarray, ctx: int, windows: int) -> tuple[float, int]:
    """Independent computation: summed torch cross-entropy (float64) of each window's logits."""
    total, count = 0.0, 0
    for w in range(windows):
        window = torch.from_numpy(ids[w * ctx:(w + 1) * ctx].copy())
        logits = torch.as_tensor(logits_of(window[None]))[0].double()
        total += torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum").item()
        count += ctx - 1
    return math.exp(total / count), count


def test_equals_torch_cross_entropy_of_the_hf_model(tiny):
    model, cm, ids = tiny
    got = perplexity(cm, ids, ctx=CTX, windows=WINDOWS)
    with torch.no_grad():
        want, count = torch_ppl(lambda x: model(x).logits, ids, CTX, WINDOWS)
    # float32 logits of numpy vs torch differ by ~1e-6 relative; the mean NLL far less than 1e-5
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["tokens_scored"] == count == WINDOWS * (CTX - 1)
    assert (got["windows"], got["ctx"]) == (WINDOWS, CTX)
    assert got["nll"] == pytest.approx(math.log(got["ppl"]))
    assert got["seconds"] >= 0


def test_eval_of_a_quantized_model_equals_ppl_from_its_own_logits(tiny):
    """The must-show: perplexity() runs the compiled (quantized) model; on 2 windows its ppl is
    the ppl of cm(input_ids) logits of the same compiled model, not of the float HF model."""
    model, _, ids = tiny
    cm = bitsmith.compile(model, target="reference", quant="bitmod-w3", group_size=32)
    got = perplexity(cm, ids, ctx=CTX, windows=2)
    want, _ = torch_ppl(cm, ids, CTX, 2)
    assert got["ppl"] == pytest.approx(want, rel=1e-12)  # same logits; only the float64 reductions differ
    with torch.no_grad():
        float_ppl, _ = torch_ppl(lambda x: model(x).logits, ids, CTX, 2)
    assert abs(got["ppl"] - float_ppl) > 1e-4 * float_ppl  # 3-bit weights really were used


def test_windows_are_independent_and_first_token_unscored(tiny):
    _, cm, ids = tiny
    whole = perplexity(cm, ids, ctx=CTX, windows=2)
    second = perplexity(cm, ids[CTX:], ctx=CTX, windows=1)
    first = perplexity(cm, ids, ctx=CTX, windows=1)
    assert whole["nll"] == pytest.approx((first["nll"] + second["nll"]) / 2, rel=1e-12)


def test_short_text_scores_the_windows_it_has(tiny):
    _, cm, ids = tiny
    seen = []
    got = perplexity(cm, ids, ctx=CTX, windows=10, progress=lambda done, total: seen.append((done, total)))
    assert got["windows"] == WINDOWS  # the partial fourth window is not scored
    assert seen == [(i, WINDOWS) for i in range(WINDOWS + 1)]


@pytest.mark.parametrize("kwargs, words", [
    ({"ctx": CTX * 10}, "fewer than one window of ctx=240"),
    ({"ctx": 1}, "ctx must be >= 2"),
    ({"windows": 0}, "windows must be >= 1"),
    ({"ctx": 1000}, "exceeds the model's 256 positions"),
])
def test_bad_arguments(tiny, kwargs, words):
    _, cm, ids = tiny
    with pytest.raises(ValueError, match=words):
        perplexity(cm, ids[:CTX * 9], **kwargs)


def test_refuses_a_model_that_is_no_language_model():
    from artifact_helpers import compiled
    with pytest.raises(ValueError, match="causal language model"):
        perplexity(compiled(), np.arange(10), ctx=4)


def test_token_nll_is_float64_log_softmax():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=np.float32)
    nll = token_nll(logits, np.array([1, 2]))
    assert nll.dtype == np.float64
    np.testing.assert_allclose(nll, [1e4, math.log(3)], rtol=1e-12)


def test_shared_data_helper_skips_with_a_reason_where_the_file_is_absent():
    from conftest import shared_data_file
    with pytest.raises(pytest.skip.Exception, match=r"needs \.\./shared/data/text/no-such-file\.txt .*absent"):
        shared_data_file("text", "no-such-file.txt")


def test_quality_benchmark_text_holds_the_windows_it_reports(shared_text, request):
    """benchmarks/results/quality.md scores the first 64 windows of 1024 SmolLM2 tokens of
    prideprejudice.txt: the text must hold all 64 (fewer would silently score fewer)."""
    text = shared_text("prideprejudice.txt").read_text(encoding="utf-8")  # skips before loading SmolLM2
    _, tokenizer = request.getfixturevalue("smollm2")
    ids = tokenizer(text)["input_ids"]
    assert window_count(len(ids), 1024, 64) == 64
