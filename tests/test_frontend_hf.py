"""HF causal LMs through torch.export: logits, KV cache and generation against torch eager."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.errors import UnsupportedOpError
from bitsmith.runtime.generate import empty_cache, positions

from bitsmith.testing.hf_configs import ARCHS, VOCAB, make_model

# fp32 end to end; numpy and torch differ only in summation order (~1e-7 here), so 1e-4 is
# the bound with a wide margin.
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    model = make_model(request.param)
    return model, bitsmith.compile(model, target="reference")


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 1), (1, 3), (2, 8), (3, 17)])
def test_logits_match_eager(pair, batch, seq):
    model, cm = pair
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = cm(ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert (got - ref).abs().max().item() <= ATOL


def test_prefill_then_decode_matches_full_recompute(pair):
    model, cm = pair
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7)).numpy()
    full = cm(torch.from_numpy(ids)).numpy()
    prompt = 5
    logits, *cache = cm.run("main", [ids[:, :prompt], positions(2, 0, prompt), *empty_cache(cm.module, 2)])
    np.testing.assert_allclose(logits, full[:, :prompt], atol=ATOL, rtol=0)
    for t in range(prompt, ids.shape[1]):
        logits, *cache = cm.run("main", [ids[:, t:t + 1], positions(2, t, 1), *cache])
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=ATOL, rtol=0)
    assert cache[0].shape[2] == ids.shape[1]


def test_greedy_generate_matches_transformers(pair):
    model, cm = pair
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = cm.generate(ids, max_new_tokens=32)
    assert got.dtype == torch.int64
    assert got.tolist() == ref.tolist()


def test_generate_stops_at_eos_and_pads(pair):
    _, cm = pair
    ids = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))
    free = cm.generate(ids, max_new_tokens=8)
    eos = int(free[0, 6])  # pretend the 3rd generated token is EOS
    stopped = cm.generate(ids, max_new_tokens=8, eos_token_id=eos)
    first = free[0, 4:].tolist().index(eos) + 4
    assert stopped.tolist()[0] == free.tolist()[0][:first + 1]


def test_graph_is_symbolic_and_keeps_module_paths(pair):
    model, cm = pair
    fn = cm.module.function("main")
    assert fn.params[0].type.shape == ("batch", "seq")
    assert fn.params[2].type.shape[2] == "past"
    linear_paths = {n.loc.module_path for n in fn.nodes if n.op == "linear"}
    expected = {name for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    assert expected <= linear_paths


def test_unsupported_aten_op_names_op_module_and_source_line():
    from bitsmith.frontend.export_capture import lower_exported_program

    class Inner(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return self.inner(x * 2)

    ep = torch.export.export(Outer(), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedOpError) as err:
        lower_exported_program(ep, [(None, None)], ["x"])
    msg = str(err.value)
    assert "aten.cumsum" in msg and "inner" in msg and "test_frontend_hf.py:" in msg


def test_unknown_target_and_option_are_refused():
    model = make_model("llama")
    with pytest.raises(bitsmith.UnknownTargetError) as err:
        bitsmith.compile(model, target="no-such-target")
    assert "reference" in str(err.value)
    with pytest.raises(bitsmith.UnknownOptionError):
        bitsmith.compile(model, target="reference", bogus_option=1)


def test_report_has_required_fields(pair):
    model, cm = pair
    r = cm.report()
    for key in ("params", "weight_bytes", "bits_per_weight", "op_counts", "pass_seconds", "target"):
        assert key in r
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once by torch
    buffers = sum(b.numel() for b in model.buffers())  # rotary inv_freq; GPT-2 has none in use
    assert n_params <= r["params"] <= n_params + buffers
    assert r["bits_per_weight"] == pytest.approx(32.0)
    assert r["op_counts"]["attention"] == 2
    import json
    json.dumps(r)


def test_symbolic_slice_out_of_range_is_an_error_not_a_wrong_shape():
    from bitsmith.frontend.export_capture import lower_exported_program
    from bitsmith.ir import InterpreterError, Module, run_function

    class Tail(torch.nn.Module):
        def forward(self, x):
            return x[:, -3:] * 2

    seq = torch.export.Dim("seq", min=4)
    ep = torch.export.export(Tail(), (torch.randn(2, 6, 4),), dynamic_shapes=({1: seq},))
    fn, tensors = lower_exported_program(ep, [(None, "seq", None)], ["x"])
    module = Module((fn,), tensors)
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_function(module, "main", [x])[0], x[:, -3:] * 2)
    with pytest.raises(InterpreterError, match="out of range"):
        run_function(module, "main", [x[:, :2]])


def test_zero_dim_constants_and_1d_transpose_lower():
    from bitsmith.frontend.export_capture import lower_exported_program
    from bitsmith.ir import Module, run_function

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("s", torch.tensor(3.25))
            self.v = torch.nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.s + self.v.t()

    m = M()
    ep = torch.export.export(m, (torch.randn(2, 4),))
    fn, tensors = lower_exported_program(ep, [(None, None)], ["x"])
    x = torch.randn(2, 4)
    got = run_function(Module((fn,), tensors), "main", [x.numpy()])[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), rtol=1e-6, atol=1e-6)


def test_batched_generate_with_eos_pads_like_transformers():
    model = make_model("llama")
    cm = bitsmith.compile(model, target="reference")
    ids = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(11))
    free = cm.generate(ids, max_new_tokens=10)
    eos = int(free[1, 6])  # a token row 1 produces early; other rows may never produce it
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert cm.generate(ids, max_new_tokens=10, eos_token_id=eos).tolist() == ref.tolist()


def test_generate_refuses_more_positions_than_the_model_has():
    cm = bitsmith.compile(make_model("gpt2"), target="reference")
    with pytest.raises(ValueError, match="positions"):
        cm.generate(torch.zeros(1, 250, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="seq >= 1"):
        cm(torch.zeros(1, 0, dtype=torch.long))
