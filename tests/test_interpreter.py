"""The reference interpreter against torch, op by op, on random data.

Each test builds a one-op module with ``GraphBuilder`` (so the verifier's inferred type is
also checked against the shape and dtype the interpreter produces) and compares with the
torch function of the same meaning.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.ir import OPS, GraphBuilder, TensorType, evaluate, run_function, verify_module
from bitsmith.ir.interpreter import bind_symbols, check_complete
from bitsmith.ir.ops import BINARY_ARITH_OPS, COMPARE_OPS, LOGICAL_OPS
from bitsmith.ir.types import dtype_of_numpy, numpy_dtype
from bitsmith.testing.strategies import random_modules

# fp32 elementwise: numpy and torch use different libm/SIMD kernels (a few ulp), and the
# interpreter's erf is Abramowitz-Stegun 7.1.26 (|err| < 1.5e-7).
ELEMENTWISE = dict(rtol=1e-5, atol=1e-6)
# fp32 reductions and contractions: summation order differs (pairwise vs blocked BLAS).
ACCUMULATED = dict(rtol=1e-5, atol=1e-5)

SETTINGS = settings(max_examples=20, deadline=None)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**32 - 1)


def run_op(op: str, args: Sequence[np.ndarray], attrs: dict[str, Any] | None = None,
           consts: dict[str, np.ndarray] | None = None, symbolic: dict[int, tuple] | None = None,
           bindings: dict[str, int] | None = None) -> np.ndarray:
    """Evaluates one ``op`` node on params (then constants) and checks its declared type.

    ``symbolic`` maps a param index to a shape with symbols, bound by the args' actual sizes.
    """
    args = [np.asarray(a) for a in args]
    b = GraphBuilder()
    names = [b.param(f"p{i}", TensorType((symbolic or {}).get(i, a.shape), dtype_of_numpy(a.dtype)))
             for i, a in enumerate(args)]
    names += [b.constant(n, c) for n, c in (consts or {}).items()]
    out = b.op(op, names, attrs)
    m = verify_module(b.module([out]))
    (y,) = evaluate(m, list(args))
    t = m.functions[0].result_types()[0]
    assert y.dtype == numpy_dtype(t.dtype)
    assert y.shape == t.concrete(bindings or {})
    return y


def tt(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))  # numpy ufuncs turn rank-0 arrays into scalars


def rand(seed: int, shape: tuple, low: float = -3.0, high: float = 3.0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)


def close(actual: np.ndarray, expected: torch.Tensor, tol: dict) -> None:
    np.testing.assert_allclose(actual, expected.numpy(), **tol)


def test_every_op_has_an_interpreter_rule() -> None:
    assert check_complete(OPS) == []


# ---------------------------------------------------------------- elementwise

UNARY = {
    "exp": (torch.exp, (-3, 3)), "log": (torch.log, (0.1, 5)), "sqrt": (torch.sqrt, (0, 5)),
    "rsqrt": (torch.rsqrt, (0.1, 5)), "tanh": (torch.tanh, (-3, 3)), "sigmoid": (torch.sigmoid, (-20, 20)),
    "silu": (F.silu, (-20, 20)), "relu": (torch.relu, (-3, 3)), "cos": (torch.cos, (-3, 3)),
    "sin": (torch.sin, (-3, 3)), "erf": (torch.erf, (-4, 4)), "reciprocal": (torch.reciprocal, (0.2, 5)),
    "neg": (torch.neg, (-3, 3)), "abs": (torch.abs, (-3, 3)),
}


@pytest.mark.parametrize("op", sorted(UNARY))
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_unary(op: str, shape: tuple, seed: int) -> None:
    fn, (lo, hi) = UNARY[op]
    x = rand(seed, shape, lo, hi)
    close(run_op(op, [x]), fn(tt(x)), ELEMENTWISE)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_gelu(approximate: str, shape: tuple, seed: int) -> None:
    x = rand(seed, shape, -5, 5)
    close(run_op("gelu", [x], {"approximate": approximate}),
          F.gelu(tt(x), approximate=approximate), ELEMENTWISE)


@st.composite
def broadcast_pair(draw: st.DrawFn) -> tuple[tuple, tuple]:
    out = draw(st.lists(st.integers(1, 4), max_size=3))
    a = [d if draw(st.booleans()) else 1 for d in out][draw(st.integers(0, len(out))):]
    b = [d if draw(st.booleans()) else 1 for d in out][draw(st.integers(0, len(out))):]
    return tuple(a), tuple(b)


TORCH_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt,
    "le": torch.le, "gt": torch.gt, "ge": torch.ge, "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
}


@pytest.mark.parametrize("op", BINARY_ARITH_OPS + COMPARE_OPS + LOGICAL_OPS)
@SETTINGS
@given(shapes=broadcast_pair(), seed=seeds, ints=st.booleans())
def test_binary(op: str, shapes, seed: int, ints: bool) -> None:
    assert set(TORCH_BINARY) == set(BINARY_ARITH_OPS + COMPARE_OPS + LOGICAL_OPS)
    sa, sb = shapes
    if op in LOGICAL_OPS:
        a, b = rand(seed, sa) > 0, rand(seed + 1, sb) > 0
    elif op == "pow":  # positive base keeps fractional powers real
        a, b = rand(seed, sa, 0.1, 3), rand(seed + 1, sb, -2, 2)
    elif ints and op != "div":  # small ints make equality comparisons hit both outcomes
        a, b = rand(seed, sa, -3, 3).round().astype(np.int64), rand(seed + 1, sb, -3, 3).round().astype(np.int64)
    else:
        a, b = rand(seed, sa).round(1), rand(seed + 1, sb, 0.5, 3) * np.sign(rand(seed + 2, sb))
    close(run_op(op, [a, b]), TORCH_BINARY[op](tt(a), tt(b)), ELEMENTWISE)


@SETTINGS
@given(shapes=broadcast_pair(), seed=seeds)
def test_where(shapes, seed: int) -> None:
    sa, sb = shapes
    cond, a, b = rand(seed, sa) > 0, rand(seed + 1, sb), rand(seed + 2, sa)
    expected = torch.where(tt(cond), tt(a), tt(b))
    close(run_op("where", [cond, a, b]), expected, dict(rtol=0, atol=0))


@pytest.mark.parametrize("dtype", ["float16", "float64", "int64", "int32", "bool"])
@SETTINGS
@given(shape=shapes, seed=seeds)
def test_cast(dtype: str, shape: tuple, seed: int) -> None:
    x = rand(seed, shape, -100, 100)  # in range for every target; float->int truncates toward 0
    expected = tt(x).to(getattr(torch, dtype))
    close(run_op("cast", [x], {"dtype": dtype}), expected, dict(rtol=0, atol=0))


def test_not() -> None:
    x = np.array([[True, False]])
    assert (run_op("logical_not", [x]) == ~x).all()


# ---------------------------------------------------------------- reductions and softmax

TORCH_REDUCE = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax, "min": torch.amin}


@pytest.mark.parametrize("op", sorted(TORCH_REDUCE))
@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), data=st.data())
def test_reduce(op: str, shape: tuple, data) -> None:
    rank = len(shape)
    axes = data.draw(st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                              unique_by=lambda a: a % rank))
    keepdims = data.draw(st.booleans())
    x = rand(data.draw(seeds), shape)
    expected = TORCH_REDUCE[op](tt(x), dim=tuple(axes), keepdim=keepdims)
    close(run_op(op, [x], {"axes": tuple(axes), "keepdims": keepdims}), expected, ACCUMULATED)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), data=st.data())
def test_softmax(shape: tuple, data) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = rand(data.draw(seeds), shape, -30, 30)
    close(run_op("softmax", [x], {"axis": axis}), torch.softmax(tt(x), dim=axis), ACCUMULATED)


# ---------------------------------------------------------------- linear algebra

@SETTINGS
@given(batch=broadcast_pair(), mkn=st.tuples(*[st.integers(1, 6)] * 3), seed=seeds)
def test_matmul(batch, mkn, seed: int) -> None:
    (ba, bb), (m, k, n) = batch, mkn
    a, b = rand(seed, ba + (m, k)), rand(seed + 1, bb + (k, n))
    close(run_op("matmul", [a, b]), torch.matmul(tt(a), tt(b)), ACCUMULATED)


@SETTINGS
@given(lead=shapes, io=st.tuples(st.integers(1, 6), st.integers(1, 6)), bias=st.booleans(), seed=seeds)
def test_linear(lead: tuple, io, bias: bool, seed: int) -> None:
    x, w, b = rand(seed, lead + (io[0],)), rand(seed + 1, (io[1], io[0])), rand(seed + 2, (io[1],))
    consts = {"w": w, "b": b} if bias else {"w": w}
    expected = F.linear(tt(x), tt(w), tt(b) if bias else None)
    close(run_op("linear", [x], consts=consts), expected, ACCUMULATED)


@SETTINGS
@given(ids_shape=shapes, vocab=st.integers(1, 6), dim=st.integers(1, 4), seed=seeds)
def test_embedding(ids_shape: tuple, vocab: int, dim: int, seed: int) -> None:
    table = rand(seed, (vocab, dim))
    ids = np.random.default_rng(seed).integers(0, vocab, ids_shape)
    expected = F.embedding(tt(ids), tt(table))
    close(_embedding(table, ids), expected, dict(rtol=0, atol=0))


def _embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """run_op puts constants after params; embedding takes the table first."""
    b = GraphBuilder()
    t = b.constant("embed.weight", table)
    i = b.param("ids", TensorType(ids.shape, "int64"))
    m = verify_module(b.module([b.op("embedding", [t, i])]))
    return evaluate(m, [ids])[0]


@SETTINGS
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), affine=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-6, 0.1]), seed=seeds)
def test_layer_norm(shape: tuple, affine: bool, eps: float, seed: int) -> None:
    x, w, b = rand(seed, shape), rand(seed + 1, shape[-1:]), rand(seed + 2, shape[-1:])
    consts = {"w": w, "b": b} if affine else None
    expected = F.layer_norm(tt(x), shape[-1:], tt(w) if affine else None,
                            tt(b) if affine else None, eps)
    # variance of a near-constant row divides small differences: allow a little more than fp32 sums
    close(run_op("layer_norm", [x], {"eps": eps}, consts=consts), expected, dict(rtol=1e-4, atol=1e-4))


@SETTINGS
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 3), s=st.integers(1, 5),
       extra=st.integers(0, 3), d=st.integers(1, 8), causal=st.booleans(), seed=seeds)
def test_attention(b: int, hkv: int, group: int, s: int, extra: int, d: int, causal: bool, seed: int) -> None:
    # t >= s: with bottom-right alignment a query row then always sees at least one key
    t, hq, scale = s + extra, hkv * group, d ** -0.5
    q, k, v = rand(seed, (b, hq, s, d)), rand(seed + 1, (b, hkv, t, d)), rand(seed + 2, (b, hkv, t, d))
    tq, tk, tv = (tt(a) for a in (q, k, v))
    tk, tv = tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1)  # GQA
    if causal and s == t:
        expected = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale)
    else:
        mask = torch.ones(s, t, dtype=torch.bool).tril(diagonal=t - s) if causal else None
        expected = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=scale)
    close(run_op("attention", [q, k, v], {"scale": scale, "causal": causal}), expected, ACCUMULATED)


# ---------------------------------------------------------------- sources

def test_scalar_and_arange() -> None:
    assert run_op("scalar", [], {"value": 2.5, "dtype": "float16"}) == np.float16(2.5)
    close(run_op("arange", [], {"start": 2, "end": 11, "step": 3, "dtype": "int64"}),
          torch.arange(2, 11, 3), dict(rtol=0, atol=0))


def test_symbolic_arange_and_reshape() -> None:
    x = rand(0, (2, 3, 4))
    y = run_op("reshape", [x], {"shape": ("batch*seq", 4)}, symbolic={0: ("batch", "seq", 4)},
               bindings={"batch": 2, "seq": 3})
    close(y, tt(x).reshape(6, 4), dict(rtol=0, atol=0))
    y = run_op("arange", [], {"start": 0, "end": 5, "step": 1, "dtype": "int32"})
    assert y.tolist() == list(range(5))


# ---------------------------------------------------------------- data movement (exact)

EXACT = dict(rtol=0, atol=0)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple), data=st.data())
def test_reshape_permute_expand(shape: tuple, data) -> None:
    x = rand(data.draw(seeds), shape)
    tx = tt(x)
    new = tuple(data.draw(st.permutations(list(shape))))
    close(run_op("reshape", [x], {"shape": new}), tx.reshape(new), EXACT)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    close(run_op("permute", [x], {"perm": perm}), tx.permute(perm), EXACT)
    target = (2,) + tuple(data.draw(st.sampled_from([d, 3])) if d == 1 else d for d in shape)
    close(run_op("expand", [x], {"shape": target}), tx.expand(target), EXACT)


@SETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), data=st.data())
def test_slice(shape: tuple, data) -> None:
    axis = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, shape[axis] - 1))
    end = data.draw(st.integers(start, shape[axis]))
    step = data.draw(st.integers(1, 3))
    x = rand(data.draw(seeds), shape)
    index = (slice(None),) * axis + (slice(start, end, step),)
    y = run_op("slice", [x], {"axis": axis, "start": start, "end": end, "step": step})
    close(y, tt(x)[index], EXACT)


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple), data=st.data())
def test_concat(shape: tuple, data) -> None:
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    parts = []
    for i in range(data.draw(st.integers(1, 3))):
        s = list(shape)
        s[axis] = data.draw(st.integers(1, 3))
        parts.append(rand(i, tuple(s)))
    close(run_op("concat", parts, {"axis": axis}), torch.cat([tt(p) for p in parts], dim=axis), EXACT)


# ---------------------------------------------------------------- whole graphs

@settings(max_examples=40, deadline=None)
@given(random_modules())
def test_random_graphs_produce_declared_types(module_and_args) -> None:
    """Whatever the verifier accepts, the interpreter runs, each value with its declared type."""
    module, args = module_and_args
    fn = module.functions[0]
    bindings = bind_symbols(fn, args)

    def check(node, outs) -> None:
        for v, arr in zip(node.outputs, outs):
            assert arr.dtype == numpy_dtype(v.type.dtype) and arr.shape == v.type.concrete(bindings), node

    run_function(module, "main", args, observe=check)


# ---------------------------------------------------------------- accuracy scheme (issue 9)
# The oracle rounds each accumulating op once: its result is the exact value rounded to
# float32. math.fsum is correctly rounded to float64, so float32(fsum) is that value except
# where double rounding hits a float32 tie: within 1 float32 ulp of the exact value, always.

def _exact_f32(terms, divisor: int = 1) -> np.float32:
    import math
    return np.float32(math.fsum(float(t) for t in terms) / divisor)


def _within_one_ulp(got: np.ndarray, want: np.ndarray) -> None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.abs(got.astype(np.float64) - want) <= np.spacing(np.abs(want)))


@SETTINGS
@given(m=st.integers(1, 3), k=st.integers(1, 300), n=st.integers(1, 3), bias=st.booleans(), seed=seeds)
def test_linear_is_the_exact_dot_product_rounded_once(m: int, k: int, n: int, bias: bool, seed: int) -> None:
    # wide dynamic range, so float32 accumulation would cancel and round visibly
    x = (rand(seed, (m, k)) * np.exp2(rand(seed + 3, (m, k), -12, 12).round())).astype(np.float32)
    w, b = rand(seed + 1, (n, k)), rand(seed + 2, (n,))
    got = run_op("linear", [x], consts={"w": w, "b": b} if bias else {"w": w})
    want = np.array([[_exact_f32([*(np.float64(x[i]) * w[j]), *([b[j]] if bias else [])])
                      for j in range(n)] for i in range(m)])
    _within_one_ulp(got, want)


@SETTINGS
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple), seed=seeds)
def test_sum_and_mean_are_exact_sums_rounded_once(shape: tuple, seed: int) -> None:
    x = (rand(seed, shape) * np.exp2(rand(seed + 1, shape, -12, 12).round())).astype(np.float32)
    attrs = {"axes": (-1,), "keepdims": False}
    rows = x.reshape(-1, shape[-1])
    _within_one_ulp(run_op("sum", [x], attrs).reshape(-1), [_exact_f32(r) for r in rows])
    # mean = sum / n in float64, rounded once: float32(fsum / n) is within 1 ulp too
    _within_one_ulp(run_op("mean", [x], attrs).reshape(-1), [_exact_f32(r, len(r)) for r in rows])


def test_cancellation_that_float32_accumulation_loses() -> None:
    # 1e8 + 1 rounds back to 1e8 in float32, so accumulating this dot product left to right in
    # float32 gives 0 (BLAS kernels may pick another order; the exact answer is 1)
    x = np.array([[1e8, 1.0, -1e8]], dtype=np.float32)
    w = np.ones((1, 3), dtype=np.float32)
    assert (x[0, 0] + x[0, 1]) + x[0, 2] == 0.0  # the loss this test guards against, in plain fp32
    assert run_op("linear", [x], consts={"w": w})[0, 0] == 1.0
    assert run_op("matmul", [x, w.T.copy()])[0, 0] == 1.0
    assert run_op("sum", [x], {"axes": (-1,), "keepdims": False})[0] == 1.0
