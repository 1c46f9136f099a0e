"""Device-resident decode (tvm-cuda): seeded weights, the fixed-capacity cache, CUDA-graph host logic.

Without a GPU: the seeded-weight generator is the documented PCG64 stream and a fixed float
conversion (checked against a pure-Python PCG64); a seeded Llama on the reference target
matches transformers; the fixed-capacity masked cache (``StaticCacheLayout``) gives the
logits of the growing cache; ``DeviceDecoder`` runs its whole host logic on TVM's CPU device
with a fake executor and a fake graph (replay = re-running the recorded step on the same
buffers); ``StreamGraph`` drives a fake CUDA driver; ``kv_append`` is checked on llvm.
slow: kv_append built by nvcc for sm_90. gpu: the decoder on a prebuilt tiny Llama against
the plain per-call path (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bitsmith.backends.tvm.cuda_decode import DeviceDecoder, DeviceDecodeUnavailable, StaticCacheLayout
from bitsmith.backends.tvm.cuda_graph import CudaGraphUnavailable, DriverAPI, StreamGraph
from bitsmith.errors import ArtifactError
from bitsmith.testing.llama_shape import LlamaShape
from bitsmith.testing.seeded_llama import NORM_SPREAD, STD, SeededLlama, seeded_array

TINY = SeededLlama(LlamaShape(hidden=64, heads=4, kv_heads=2, intermediate=96, layers=2, vocab=96,
                              max_positions=128), tie_word_embeddings=True, seed=7)


# ---------------------------------------------------------------- seeded weights

def _pcg64_raw(state: int, inc: int, n: int) -> list[int]:
    """PCG64 (XSL-RR 128/64, O'Neill 2014) in pure Python: the oracle for numpy's stream."""
    mult, mask = 0x2360ED051FC65DA44385DF649FCCF645, (1 << 128) - 1
    out = []
    for _ in range(n):
        state = (state * mult + inc) & mask
        x = ((state >> 64) ^ state) & ((1 << 64) - 1)
        rot = state >> 122
        out.append(((x >> rot) | (x << (64 - rot))) & ((1 << 64) - 1))
    return out


def test_seeded_array_is_the_pcg64_stream_and_a_fixed_conversion():
    from bitsmith.testing import seeded_llama
    name, shape = "model.layers.0.mlp.up_proj.weight", (3, 5)
    st = seeded_llama._stream(11, name).state["state"]
    raw = _pcg64_raw(st["state"], st["inc"], 8)
    halves = [h for r in raw for h in (r & 0xFFFFFFFF, r >> 32)][:15]
    scale = np.float32(STD * np.sqrt(3.0))
    want = np.array([np.float32((np.float32((h >> 8) * 2.0 ** -23) - np.float32(1)) * scale) for h in halves],
                    np.float32).reshape(shape)
    got = seeded_array(11, name, shape)
    assert got.tobytes() == want.tobytes()
    assert seeded_array(11, name, shape).tobytes() == got.tobytes()   # same bytes twice


def test_seeded_weights_differ_by_name_and_seed_and_have_the_stated_spread():
    a = seeded_array(0, "w", (256, 256))
    assert not np.array_equal(a, seeded_array(0, "v", (256, 256)))
    assert not np.array_equal(a, seeded_array(1, "w", (256, 256)))
    assert abs(a.std() - STD) < 0.02 * STD * 5 and abs(a.mean()) < 5 * STD / 256
    n = seeded_array(0, "model.norm.weight", (4096,), norm=True)
    assert n.min() >= 1 - NORM_SPREAD and n.max() < 1 + NORM_SPREAD
    # threads and the order of tensors do not change them
    names = {n: "float16" for n in list(TINY.parameter_shapes())[:6]}
    par = TINY.tensors(names, workers=3)
    assert all(par[n].tobytes() == TINY.tensor(n).astype(np.float16).tobytes() for n in names)
    # a chunk boundary does not change the stream
    from bitsmith.testing import seeded_llama
    old = seeded_llama._CHUNK
    try:
        seeded_llama._CHUNK = 1000
        assert seeded_array(0, "w", (256, 256)).tobytes() == a.tobytes()
    finally:
        seeded_llama._CHUNK = old


# ---------------------------------------------------------------- supplied weights

@pytest.fixture(scope="module")
def tiny_hf_and_reference(tmp_path_factory):
    import bitsmith
    hf = TINY.hf_model()
    cm = bitsmith.compile(hf, target="reference")
    d = tmp_path_factory.mktemp("seeded") / "artifact"
    cm.save(str(d))
    return hf, cm, d


@pytest.fixture(scope="module")
def tiny_reference(tiny_hf_and_reference):
    return tiny_hf_and_reference[1:]


def test_seeded_model_on_the_reference_target_matches_transformers(tiny_hf_and_reference):
    """fp32 on both sides: measured 3.0e-7..3.4e-7 of max|logit| over three prompts (summation
    order); 1e-5 leaves a 30x margin while a wrong weight moves logits by O(max|logit|)."""
    import torch
    hf, cm, _ = tiny_hf_and_reference
    ids = np.random.default_rng(0).integers(0, TINY.shape.vocab, (2, 9))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(cm(torch.from_numpy(ids)))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()



def _regenerated(d: Path, cm) -> dict[str, np.ndarray]:
    manifest = json.loads((d / "manifest.json").read_text())
    out = {}
    for t in manifest["tensors"]:
        try:
            out[t["name"]] = TINY.tensor(t["name"]).astype(t["dtype"])
        except KeyError:  # rotary inv_freq: not a parameter, travels as is
            out[t["name"]] = np.asarray(cm.module.tensors[t["name"]])
    return out


def test_artifact_loads_with_regenerated_weights_and_refuses_wrong_ones(tiny_reference, tmp_path):
    from bitsmith.runtime.artifact import load_artifact
    cm, d = tiny_reference
    stripped = tmp_path / "stripped"
    shutil.copytree(d, stripped)
    (stripped / "weights.safetensors").unlink()
    weights = _regenerated(stripped, cm)
    loaded = load_artifact(stripped, weights=weights)
    ids = np.arange(6)[None]
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(cm(ids)))
    hf16 = TINY.hf_model(arrays=weights)  # built from the artifact's arrays: the same weights
    assert all(np.array_equal(p.detach().numpy(), TINY.tensor(n)) for n, p in hf16.named_parameters()
               if n != "model.embed_tokens.weight")
    bad = dict(weights)
    bad["model.norm.weight"] = bad["model.norm.weight"] + np.float32(1e-3)
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(stripped, weights=bad)
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(stripped, weights={k: v for k, v in weights.items() if k != "model.norm.weight"})


# ---------------------------------------------------------------- fixed-capacity cache

def _append_numpy(present: np.ndarray, slot: int, past: np.ndarray) -> None:
    past[:, :, slot] = present[:, :, -1]


@pytest.mark.parametrize("ragged", [False, True])
def test_fixed_capacity_masked_cache_gives_the_growing_cache_logits(tiny_reference, ragged):
    """Same keys visible in the same order, masked slots add exact zeros (exp(-inf)): measured
    difference 0.0 over 6 prompts (dense and ragged) on this CPU; BLAS on another CPU may group
    the sums of different shapes differently (fp32 roundoff 6e-8 per op), so 1e-5 is allowed.
    Tokens must be equal."""
    from bitsmith.runtime.generate import decode_generate
    from bitsmith.runtime.padding import mask_positions
    cm, _ = tiny_reference
    run, module = cm.run, cm.module
    rng = np.random.default_rng(3)
    ids = rng.integers(0, TINY.shape.vocab, (2, 5))
    mask = np.ones_like(ids)
    if ragged:
        mask[0, :2] = 0
    steps = 6
    want = decode_generate(run, module, ids, steps, attention_mask=mask)
    layout = StaticCacheLayout(mask, 5 + steps + 3)
    n_cache = len(module.function("main").params) - 3
    empty = [np.zeros((2, TINY.shape.kv_heads, 0, TINY.shape.head_dim), np.float32)] * n_cache
    logits, *present = run("main", [ids, mask_positions(mask), *empty, mask])
    past = [layout.past_from_prefill(p) for p in present]
    tokens = [np.argmax(logits[:, -1], -1)]
    for k in range(steps - 1):
        logits, *present = run("main", [tokens[-1][:, None], layout.positions(k), *past, layout.mask(k)])
        for pr, pa in zip(present, past):
            _append_numpy(pr, layout.slot(k), pa)
        tokens.append(np.argmax(logits[:, -1], -1))
    np.testing.assert_array_equal(np.stack(tokens, 1), want[:, 5:])
    # the last step's logits against the growing cache's
    full = run("main", [want[:, :-1], mask_positions(np.concatenate([mask, np.ones((2, steps - 1), np.int64)], 1)),
                        *empty, np.concatenate([mask, np.ones((2, steps - 1), np.int64)], 1)])[0][:, -1]
    assert np.abs(logits[:, -1] - full).max() <= 1e-5 * np.abs(full).max()


def test_layout_refuses_steps_beyond_capacity():
    layout = StaticCacheLayout(np.ones((1, 4), np.int64), 8)
    assert layout.max_steps == 3 and layout.slot(2) == 6
    with pytest.raises(ValueError, match="capacity"):
        layout.slot(3)
    with pytest.raises(ValueError, match="capacity"):
        StaticCacheLayout(np.ones((1, 8), np.int64), 8)


# ---------------------------------------------------------------- DeviceDecoder host logic (CPU device)

class _InterpreterExecutor:
    """What DeviceDecoder uses of CudaPlanExecutor, on the reference interpreter and TVM CPU tensors."""

    def __init__(self, cm, tvm) -> None:
        self.cm, self.tvm = cm, tvm
        self.plan = type("P", (), {"params": [0], "steps": []})()

    def run(self, args):
        return self.cm.run("main", args)

    def run_static(self, inputs, pool, host_ids=None):
        outs = self.cm.run("main", [t.numpy() for t in inputs])
        result = []
        for k, o in enumerate(outs):
            if k not in pool or tuple(pool[k].shape) != o.shape:
                pool[k] = self.tvm.runtime.empty(o.shape, "float32", self.tvm.cpu())
            pool[k].copyfrom(o.astype(np.float32))
            result.append(pool[k])
        return result


class _ReplayGraph:
    """A 'graph' that records the step callable and replays it: the buffers are what count."""

    def __init__(self, device, fail: str | None = None) -> None:
        self.fail, self.step, self.replays, self.captured = fail, None, 0, False

    def run(self, step):
        step()

    def synchronize(self):
        pass

    def capture(self, step):
        if self.fail:
            raise CudaGraphUnavailable(self.fail)
        self.step, self.captured = step, True

    def replay(self):
        self.replays += 1
        self.step()

    def close(self):
        pass


def _tvm_append(present, slot, past):
    p = past.numpy()
    p[np.arange(p.shape[0]), :, slot.numpy()] = present.numpy()[:, :, -1]
    past.copyfrom(p)


@pytest.mark.parametrize("fail", [None, "capture refused by the driver"])
def test_device_decoder_host_logic_matches_decode_generate(tiny_reference, fail):
    tvm = pytest.importorskip("tvm")
    from bitsmith.runtime.generate import decode_generate
    cm, _ = tiny_reference
    graphs = []

    def factory(device):
        graphs.append(_ReplayGraph(device, fail))
        return graphs[-1]

    dec = DeviceDecoder(_InterpreterExecutor(cm, tvm), cm.module, {"float32": _tvm_append}, tvm.cpu(),
                        graph_factory=factory)
    ids = np.random.default_rng(5).integers(0, TINY.shape.vocab, (3, 4))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    got = dec.generate(ids, 7, attention_mask=mask)
    np.testing.assert_array_equal(got, decode_generate(cm.run, cm.module, ids, 7, attention_mask=mask))
    if fail:
        assert dec.mode == "kernels" and dec.fallback_reason == fail
    else:
        assert dec.mode == "graph" and graphs[-1].replays == 5  # 6 decode steps: one warm-up, 5 replays
    assert dec.timings.decode_steps == 6


def test_device_decoder_refuses_artifacts_without_what_it_needs(tiny_reference):
    tvm = pytest.importorskip("tvm")
    cm, _ = tiny_reference
    with pytest.raises(DeviceDecodeUnavailable, match="kv_append"):
        DeviceDecoder(_InterpreterExecutor(cm, tvm), cm.module, {}, tvm.cpu())
    from bitsmith.passes.drop_attention_mask import DropAttentionMask
    with pytest.raises(DeviceDecodeUnavailable, match="attention_mask"):
        DeviceDecoder(_InterpreterExecutor(cm, tvm), DropAttentionMask().apply(cm.module), {}, tvm.cpu())


# ---------------------------------------------------------------- StreamGraph on a fake driver

class _FakeDriver:
    def __init__(self, refuse: str | None = None) -> None:
        self.calls, self.refuse = [], refuse
        names = ("cuStreamCreate", "cuStreamDestroy_v2", "cuStreamSynchronize", "cuStreamBeginCapture_v2",
                 "cuStreamEndCapture", "cuGraphInstantiateWithFlags", "cuGraphLaunch", "cuGraphExecDestroy",
                 "cuGraphDestroy", "cuGetErrorName")
        for n in names:
            setattr(self, n, self._fn(n))

    def _fn(self, name):
        def f(*args):
            self.calls.append(name)
            if name == self.refuse:
                return 900  # CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
            if name in ("cuStreamCreate", "cuStreamEndCapture", "cuGraphInstantiateWithFlags"):
                ctypes.cast(args[0 if name != "cuStreamEndCapture" else 1], ctypes.POINTER(ctypes.c_void_p))[0] = 0x1000
            if name == "cuGetErrorName":
                ctypes.cast(args[1], ctypes.POINTER(ctypes.c_char_p))[0] = b"CUDA_ERROR_FAKE"
            return 0
        return f


class _NoStream:
    def __init__(self, *a):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_stream_graph_captures_once_and_replays_with_one_launch():
    drv = _FakeDriver()
    g = StreamGraph("dev", DriverAPI(drv), use_stream=_NoStream)
    launched = []
    g.run(lambda: launched.append("warm"))
    g.capture(lambda: launched.append("recorded"))
    drv.calls.clear()
    g.replay()
    assert drv.calls == ["cuGraphLaunch"] and launched == ["warm", "recorded"]
    g.close()
    assert "cuGraphExecDestroy" in drv.calls and "cuStreamDestroy_v2" in drv.calls


def test_stream_graph_failed_capture_ends_capture_and_says_why():
    drv = _FakeDriver()
    g = StreamGraph("dev", DriverAPI(drv), use_stream=_NoStream)

    def bad():
        raise RuntimeError("cudaMalloc during capture")
    with pytest.raises(CudaGraphUnavailable, match="cudaMalloc during capture"):
        g.capture(bad)
    assert drv.calls[-2:] == ["cuStreamEndCapture", "cuGraphDestroy"] and not g.captured
    refusing = _FakeDriver(refuse="cuGraphInstantiateWithFlags")
    g = StreamGraph("dev", DriverAPI(refusing), use_stream=_NoStream)
    with pytest.raises(CudaGraphUnavailable, match="cuGraphInstantiateWithFlags failed: CUDA_ERROR_FAKE"):
        g.capture(lambda: None)


def test_driver_without_graph_entry_points_is_a_reason_not_a_crash():
    class Old:
        cuStreamCreate = staticmethod(lambda *a: 0)
    with pytest.raises(CudaGraphUnavailable, match="lacks"):
        DriverAPI(Old())


# ---------------------------------------------------------------- kv_append kernel

def test_kv_append_kernel_writes_the_new_entry_into_each_rows_slot():
    tvm = pytest.importorskip("tvm")
    from bitsmith.backends.tvm.kv_append import kv_append_kernel
    k = kv_append_kernel("float16")
    lib = tvm.compile(tvm.IRModule({"main": k.func}), target="llvm")
    rng = np.random.default_rng(0)
    present = rng.standard_normal((3, 2, 9, 8)).astype(np.float16)
    past = rng.standard_normal((3, 2, 8, 8)).astype(np.float16)
    slot = np.array([0, 5, 7], np.int64)
    want = past.copy()
    want[np.arange(3), :, slot] = present[:, :, -1]
    args = [tvm.runtime.tensor(a) for a in (present, slot, past)]
    lib["main"](*args)
    np.testing.assert_array_equal(args[2].numpy(), want)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kv_append_builds_with_nvcc_for_sm90(tmp_path):
    from bitsmith.backends.tvm.cuda_build import CudaCompiler
    from bitsmith.backends.tvm.kv_append import kv_append_kernel
    from bitsmith.backends.tvm.schedule_cuda import cuda_target
    k = CudaCompiler(cuda_target("sm_90"), directory=tmp_path).compile(kv_append_kernel("float16"))
    assert k.fatbin and ".target sm_90" in k.ptx and ".entry" in k.ptx


# ---------------------------------------------------------------- on the GPU

@pytest.mark.gpu
def test_device_decoder_on_gpu_matches_the_per_call_path():
    """A prebuilt tiny Llama (cuda_cases, carries kv_append): graph decode and per-kernel decode
    replay the same launches on the same fixed-capacity layout, so their tokens are equal; the
    plain per-call generate cuts the split-KV chunks differently (fp32 sums in another order),
    so against it only the first new token is required equal (a later near-tie may flip)."""
    import bitsmith
    from bitsmith.backends.tvm.cuda_runtime import gpu_available
    if not gpu_available():
        pytest.skip("no GPU")
    pre = os.environ.get("BITSMITH_CUDA_PREBUILT")
    if not pre:
        pytest.skip("BITSMITH_CUDA_PREBUILT not set")
    cm = bitsmith.load(str(Path(pre) / "models" / "llama" / "artifact"), trust_native_code=True)
    ids = np.random.default_rng(1).integers(0, 128, (4, 6))
    want = np.asarray(cm.generate(ids, max_new_tokens=12))
    got = {}
    for graphs in (True, False):
        dec = cm.executable.device_decoder(graphs=graphs)
        got[graphs] = np.asarray(dec.generate(ids, 12))
        assert dec.mode == ("graph" if graphs else "kernels"), dec.fallback_reason
    np.testing.assert_array_equal(got[True], got[False])
    assert got[True].shape == want.shape
    np.testing.assert_array_equal(got[True][:, ids.shape[1]], want[:, ids.shape[1]])


@pytest.mark.slow
def test_tvm_cuda_artifact_lists_its_kv_append_kernel_and_refuses_a_bad_entry(tiny_hf_and_reference, tmp_path):
    import bitsmith
    from bitsmith.runtime.artifact import load_artifact
    hf, _, _ = tiny_hf_and_reference
    cm = bitsmith.compile(hf, target="tvm-cuda", nvcc="skip")
    doc = json.loads(cm.executable.files()["plan.json"])
    keys = {k["key"] for k in doc["kernels"]}
    assert set(doc["kv_append"]) == {"float16"} and doc["kv_append"]["float16"] in keys
    d = tmp_path / "a"
    cm.save(str(d))
    assert load_artifact(d).executable.kv_append == doc["kv_append"]
    from bitsmith.backends.tvm import cuda_target
    files = cm.executable.files()
    for bad in ({"float16": "0" * 64}, {"int8": doc["kv_append"]["float16"]}, {"float16": [1]}):
        tampered = dict(files, **{"plan.json": json.dumps(dict(doc, kv_append=bad), sort_keys=True).encode()})
        with pytest.raises(ArtifactError, match="kv_append"):
            cuda_target.load(cm.module, {}, tampered)
