"""The kernel cache's recipe keys and its parallel build (``backends/tvm/cache.py``, ``kernel.py``).

The safety property: two kernels with the same key compile to the same code. The oracle is the
kernel's TIR text (what the cache keyed on before recipes): over many kernels from the lowering
rules, the key must determine the text (equal keys, equal texts) and different texts must get
different keys. A changed code salt, schedule id or target must miss; a hit must not build any
TIR; a parallel build must give the bytes of a serial one.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

tvm = pytest.importorskip("tvm")

from bitsmith.backends.tvm import cache as kcache  # noqa: E402
from bitsmith.backends.tvm.attention import attention_kernel, embedding_kernel  # noqa: E402
from bitsmith.backends.tvm.kernel import KernelDef, Recipe, canonical_text  # noqa: E402
from bitsmith.backends.tvm.kv_inplace import kv_write_kernel  # noqa: E402
from bitsmith.backends.tvm.llvm_target import make_target  # noqa: E402
from bitsmith.backends.tvm.lowering import lower_function  # noqa: E402
from bitsmith.backends.tvm.matmul import linear_kernel  # noqa: E402
from bitsmith.backends.tvm.schedule_cpu import SCHEDULE_ID, schedule_cpu  # noqa: E402
from bitsmith.errors import BitsmithError  # noqa: E402
from bitsmith.ir.builder import GraphBuilder  # noqa: E402
from bitsmith.ir.types import TensorType  # noqa: E402

TARGET = make_target({"mcpu": "x86-64-v3"})


def key(kdef: KernelDef, schedule_id: str = SCHEDULE_ID, target=TARGET) -> str:
    return kcache.kernel_key(kdef, schedule_id, target)


def _rmsnorm_module(hidden: int, eps: float, seq="seq", op: str = "mul"):
    g = GraphBuilder()
    x = g.param("x", TensorType(("batch", seq, hidden), "float32"))
    w = g.constant("w", np.ones(hidden, np.float32))
    sq = g.op("pow", (x, g.scalar(2.0, "float32")))
    m = g.op("mean", (sq,), {"axes": (2,), "keepdims": True})
    r = g.op("rsqrt", (g.op("add", (m, g.scalar(eps, "float32"))),))
    return g.module([g.op(op, (w, g.op("mul", (x, r))))])


def _fused_kernels(module) -> list[KernelDef]:
    _, kdefs, _ = lower_function(module, module.function("main"), "tvm-llvm")
    return list(kdefs.values())


def _sample_kernels() -> list[KernelDef]:
    """Kernels differing in one thing each (a shape, a scalar's value, a dtype, an attr, an op)."""
    out: list[KernelDef] = []
    for hidden, eps, seq, op in [(16, 1e-6, "seq", "mul"), (16, 1e-5, "seq", "mul"), (32, 1e-6, "seq", "mul"),
                                 (16, 1e-6, 4, "mul"), (16, 1e-6, "seq", "add"), (16, 1e-6, "len", "mul")]:
        out += _fused_kernels(_rmsnorm_module(hidden, eps, seq, op))
    for approximate in ("none", "tanh"):  # an attribute
        g = GraphBuilder()
        x = g.param("x", TensorType(("batch", 8), "float32"))
        out += _fused_kernels(g.module([g.op("gelu", (x,), {"approximate": approximate})]))
    out += [linear_kernel(i, o, b, "float32", w) for i, o, b, w in
            [(16, 32, False, "float32"), (32, 16, False, "float32"), (16, 32, True, "float32"),
             (16, 32, False, "float16")]]
    out += [attention_kernel(4, 2, 8, 8, s, c, "float32", m, cap) for s, c, m, cap in
            [(0.125, True, None, False), (0.25, True, None, False), (0.125, False, None, False),
             (0.125, True, "int64", False), (0.125, True, "int64", True), (0.125, True, "bool", False)]]
    out += [embedding_kernel(100, 8, "int64", "float32"), embedding_kernel(100, 8, "int32", "float32"),
            kv_write_kernel("float32", "int64"), kv_write_kernel("float16", "int64")]
    return out


def test_equal_keys_mean_equal_tir_and_different_tir_different_keys():
    kdefs = _sample_kernels()
    assert all(k.recipe is not None for k in kdefs)  # every rule above is recipe-keyed
    text_of: dict[str, str] = {}
    key_of: dict[str, str] = {}
    for k in kdefs:
        kk, text = key(k), k.text()
        assert text_of.setdefault(kk, text) == text, f"key {kk} names two different kernels"
        assert key_of.setdefault(text, kk) == kk
    assert len(text_of) == len(key_of)  # key <-> text is one to one
    assert len(key_of) >= len(kdefs) - 6  # the sample differs in one thing each: few repeats (shared groups)


def test_same_group_in_two_layers_shares_one_key():
    """Equal groups with other value names (two layers) get one key: the spec uses positions."""
    g = GraphBuilder()
    x = g.param("x", TensorType(("batch", "seq", 8), "float32"))
    a = g.op("silu", (x,))
    b = g.op("linear", (a, g.constant("w", np.ones((8, 8), np.float32))))
    c = g.op("silu", (b,))
    module = g.module([c])
    _, kdefs, _ = lower_function(module, module.function("main"), "tvm-llvm")
    plan_keys = [k for k, d in kdefs.items() if d.name.startswith("fused_silu")]
    assert len(plan_keys) == 1


def test_changed_salt_schedule_or_target_misses(monkeypatch):
    k = linear_kernel(16, 32, False, "float32", "float32")
    base = key(k)
    assert key(k, "cpu-v999") != base
    assert key(k, target=make_target({"mcpu": "x86-64-v2"})) != base
    monkeypatch.setattr(kcache, "_salt", "0" * 64)
    assert key(k) != base


def test_a_kernel_keyed_by_its_tir_text_misses_when_the_code_salt_changes(monkeypatch):
    """qlinear definitions are TIR (no recipe); their scheduled code comes from the hand-written
    generators, which only the code salt covers."""
    from bitsmith.backends.tvm.matmul_defs import qlinear_func
    from bitsmith.backends.tvm.qlinear_layout import QLinearLayout
    lay = QLinearLayout(in_features=64, out_features=8, group_size=32, scheme="gguf-test", bits=4, kept=64, groups=2,
                        asymmetric=False, candidates=1, has_selectors=False, nm=None, nm_width=0, outlier_width=0,
                        has_bias=False, affine=True, grid_low=0, offsets=False, scale_dtype="float16")
    from bitsmith.backends.tvm.kernel import KernelDef
    kdef = KernelDef("q", qlinear_func(lay, [((8, 32), "uint8"), ((8, 2), "float16")], "float32"), "qgemv")
    assert kdef.recipe is None
    base = key(kdef)
    monkeypatch.setattr(kcache, "_salt", "1" * 64)
    assert key(kdef) != base


def test_code_salt_changes_with_any_source_byte(tmp_path):
    pkg = tmp_path / "bitsmith"
    src = kcache.Path(kcache.__file__).resolve().parents[2]
    for sub in kcache._SALT_SOURCES:
        shutil.copytree(src / sub, pkg / sub, ignore=shutil.ignore_patterns("__pycache__"))
    before = kcache.source_digest(pkg)
    assert before == kcache.source_digest(src)
    rule = pkg / "backends" / "tvm" / "fused_rules.py"
    rule.write_text(rule.read_text() + "\n# an edit\n")
    assert kcache.source_digest(pkg) != before
    (pkg / "ir" / "new_helper.py").write_text("X = 1\n")  # a new file counts too
    rule.write_text(rule.read_text()[:-len("\n# an edit\n")])
    assert kcache.source_digest(pkg) != before


LITERALS = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=32)
                        | st.text(max_size=3), lambda inner: st.tuples(inner, inner) | st.tuples(inner), max_leaves=6)


def _strict(v):
    """v with every leaf tagged by its type (1, 1.0, True and '1' all differ; so do 0.0 and -0.0)."""
    if type(v) is tuple:
        return ("tuple", tuple(_strict(x) for x in v))
    return (type(v).__name__, repr(v))


@settings(max_examples=300, deadline=None)
@given(a=LITERALS, b=LITERALS)
@example(a=1e-6, b=1e-5)
@example(a=1.0, b=float(np.nextafter(1.0, 2.0)))
@example(a=0.0, b=-0.0)
@example(a=1, b=1.0)
@example(a=True, b=1)
@example(a="1", b=1)
@example(a=(1,), b=((1,),))
@example(a=(1, 2), b=((1, 2),))
def test_canonical_text_is_injective(a, b):
    assert (canonical_text(a) == canonical_text(b)) == (_strict(a) == _strict(b))


def test_recipe_refuses_closures_and_non_literals():
    def local(n):
        return n
    with pytest.raises(TypeError, match="module-level"):
        Recipe(local, (1,))
    with pytest.raises(TypeError, match="plain literal"):
        Recipe(linear_kernel, (np.int64(3),))
    with pytest.raises(TypeError, match="plain literal"):
        Recipe(linear_kernel, ([1, 2],))


def _cache(tmp_path, name):
    return kcache.KernelCache(directory=tmp_path / name)


def test_hit_builds_no_tir_and_parallel_build_equals_serial(tmp_path):
    kdefs = {f"k{i}": k for i, k in enumerate(_sample_kernels()[::3])}
    serial = _cache(tmp_path, "serial").libraries(kdefs, schedule_cpu, SCHEDULE_ID, TARGET, jobs=1)
    parallel = _cache(tmp_path, "parallel").libraries(kdefs, schedule_cpu, SCHEDULE_ID, TARGET, jobs=2)
    assert serial == parallel  # same keys, same library bytes
    fresh = {name: KernelDef(k.name, k.source, k.kind) for name, k in kdefs.items()}  # nothing built yet
    warm = _cache(tmp_path, "parallel")
    assert warm.libraries(fresh, schedule_cpu, SCHEDULE_ID, TARGET) == serial
    assert (warm.hits, warm.misses) == (len(set(k for k, _ in serial.values())), 0)
    assert not any("_built" in k.__dict__ for k in fresh.values())


def test_pass_context_is_keyed_and_reaches_the_build_threads(tmp_path):
    """A PassContext config that changes the code (no argument asserts) changes the key, and the
    worker threads compile under it as the calling thread would."""
    kdefs = {"e": embedding_kernel(100, 8, "int64", "float32"), "l": linear_kernel(16, 32, False, "float32", "float32")}
    plain = _cache(tmp_path, "plain").libraries(kdefs, schedule_cpu, SCHEDULE_ID, TARGET, jobs=1)
    with tvm.transform.PassContext(config={"tirx.disable_assert": True}):
        serial = _cache(tmp_path, "serial").libraries(kdefs, schedule_cpu, SCHEDULE_ID, TARGET, jobs=1)
        parallel = _cache(tmp_path, "parallel").libraries(kdefs, schedule_cpu, SCHEDULE_ID, TARGET, jobs=2)
    assert serial == parallel
    for name in kdefs:
        assert serial[name][0] != plain[name][0] and serial[name][1] != plain[name][1]


def test_build_jobs_option(monkeypatch):
    monkeypatch.setenv("BITSMITH_BUILD_JOBS", "3")
    assert kcache.build_jobs() == 3
    monkeypatch.setenv("BITSMITH_BUILD_JOBS", "0")
    with pytest.raises(BitsmithError, match="BITSMITH_BUILD_JOBS"):
        kcache.build_jobs()
