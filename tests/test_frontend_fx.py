"""Plain nn.Modules through torch.fx: outputs against torch eager at several batch sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import bitsmith
from bitsmith.errors import UnsupportedOpError

# fp32 throughout; only summation order differs between numpy and torch.
ATOL = 1e-5


class Block(torch.nn.Module):
    def __init__(self, d: int, hidden: int, act: str) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.act = {"gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh"), "silu": torch.nn.SiLU(),
                    "relu": torch.nn.ReLU(), "sigmoid": torch.nn.Sigmoid(), "tanh": torch.nn.Tanh()}[act]
        self.down = torch.nn.Linear(hidden, d, bias=False)
        self.rms = torch.nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        h = x + self.down(self.act(self.up(self.norm(x))))
        return self.rms(h) * 0.5 - h / 3.0


@settings(max_examples=12, deadline=None)
@given(d=st.integers(1, 24), hidden=st.integers(1, 40), capture_batch=st.integers(1, 4),
       run_batch=st.integers(1, 6), act=st.sampled_from(["gelu", "gelu_tanh", "silu", "relu", "sigmoid", "tanh"]),
       seed=st.integers(0, 2**16))
def test_block_matches_torch_at_any_batch(d, hidden, capture_batch, run_batch, act, seed):
    torch.manual_seed(seed)
    m = Block(d, hidden, act).eval()
    cm = bitsmith.compile(m, target="reference", example_inputs=(torch.randn(capture_batch, d),))
    x = torch.randn(run_batch, d)
    got = cm(x)
    assert got.dtype == torch.float32 and got.shape == (run_batch, d)
    with torch.no_grad():
        assert (got - m(x)).abs().max().item() <= ATOL


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(3, 4)

    def forward(self, x, y):
        s = torch.relu(self.a(x)) + self.b(y)
        return s, torch.softmax(s, dim=-1)


def test_multiple_inputs_and_outputs():
    m = TwoInputs().eval()
    cm = bitsmith.compile(m, example_inputs=(torch.randn(2, 5, 6), torch.randn(2, 5, 3)))
    x, y = torch.randn(3, 5, 6), torch.randn(3, 5, 3)
    got = cm(x, y)
    with torch.no_grad():
        ref = m(x, y)
    assert isinstance(got, tuple) and len(got) == 2
    for g, r in zip(got, ref):
        assert (g - r).abs().max().item() <= ATOL
    assert cm.module.function("main").params[0].type.shape == ("batch", 5, 6)


def test_generate_raises_for_plain_modules():
    cm = bitsmith.compile(torch.nn.Linear(3, 3), example_inputs=(torch.randn(2, 3),))
    with pytest.raises(TypeError, match="causal language model"):
        cm.generate(torch.zeros(1, 2, dtype=torch.long))


def test_unsupported_function_is_named():
    class Cum(torch.nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    with pytest.raises(UnsupportedOpError, match="cumsum"):
        bitsmith.compile(Cum(), example_inputs=(torch.randn(2, 3),))


def test_plain_module_needs_example_inputs():
    with pytest.raises(bitsmith.ModelLoadError, match="example_inputs"):
        bitsmith.compile(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("fn", [lambda x, y: torch.add(x, y, alpha=3),
                                 lambda x, y: torch.div(x, y, rounding_mode="floor")])
def test_binary_keyword_arguments_are_refused_not_ignored(fn):
    class M(torch.nn.Module):
        def forward(self, x, y):
            return fn(x, y)

    with pytest.raises(UnsupportedOpError, match="alpha or rounding_mode"):
        bitsmith.compile(M(), example_inputs=(torch.randn(2, 3), torch.randn(2, 3)))


class IntegerOut(torch.nn.Module):
    def forward(self, x, ids):
        return x * 2.0, ids * 3 + 1


@pytest.mark.parametrize("target", ["reference", "tvm-llvm"])
def test_integer_outputs_keep_their_dtype(target):
    """A plain module's int64 output stays int64 (a float32 cast would round ids above 2**24)."""
    if target == "tvm-llvm":
        pytest.importorskip("tvm")
    m = IntegerOut()
    cm = bitsmith.compile(m, target=target, example_inputs=(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.long)))
    x, ids = torch.randn(4, 3), torch.arange(12).reshape(4, 3) + 2**40
    got_x, got_ids = cm(x, ids)
    want_x, want_ids = m(x, ids)
    assert got_x.dtype == torch.float32 and got_ids.dtype == torch.int64
    assert torch.equal(got_ids, want_ids)
    assert (got_x - want_x).abs().max().item() <= ATOL
