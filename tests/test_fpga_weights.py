"""The MV/MM units' weight decoding (bitsmith/backends/fpga/weights.py) against the IR's
meaning of qlinear (bitsmith.ir.quantized.dequantize), and the presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitsmith.backends.fpga import presets
from bitsmith.backends.fpga.weights import compress_fp32_nm, decode_rows, fp32_layer, qlinear_layer
from bitsmith.ir.quant_grids import fitted_schemes
from bitsmith.ir.quantized import dequantize, operand_types

SCHEME_NAMES = sorted(fitted_schemes())  # gguf-* blocks are dequantized by the fpga pipeline


@given(st.sampled_from(SCHEME_NAMES), st.sampled_from(["", "2:4", "4:16", "8:16"]), st.integers(1, 6),
       st.sampled_from([16, 32, 48]), st.sampled_from([8, 16, 24]), st.data())
@settings(max_examples=80, deadline=None)
def test_tile_decode_equals_dequantize(scheme, sparsity, out_f, in_f, group, data):
    """Exact: the same float32 products in the same order (table value * scale)."""
    attrs = {"scheme": scheme, "group_size": group, "in_features": in_f, "out_features": out_f,
             "sparsity": sparsity, "outliers": 0.0, "bias": False}
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ops = []
    for role, t in operand_types(attrs):
        if t.dtype == "uint8":
            ops.append(rng.integers(0, 256, t.shape, dtype=np.uint8))
        else:
            ops.append((rng.standard_normal(t.shape) * 0.05).astype(np.float16))
    layer = qlinear_layer("l", attrs, [(r, t.shape, t.dtype) for r, t in operand_types(attrs)], None)
    arrays = {s.role: a for s, a in zip(layer.sections, ops)}
    r0 = data.draw(st.integers(0, out_f - 1))
    r1 = data.draw(st.integers(r0 + 1, out_f))
    want = dequantize(attrs, ops)[r0:r1]
    got = decode_rows(layer, arrays, slice(r0, r1))
    assert np.array_equal(got, want)


@given(st.sampled_from([(2, 4), (4, 16), (8, 16), (1, 4)]), st.integers(1, 5), st.integers(1, 4), st.data())
def test_fp32_nm_compression_round_trips(nm, rows, blocks, data):
    n, m = nm
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    w = rng.standard_normal((rows, blocks * m)).astype(np.float32)
    keep = np.argsort(-np.abs(w.reshape(rows, blocks, m)), axis=-1)[..., :data.draw(st.integers(0, n))]
    mask = np.zeros((rows, blocks, m), bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    w = np.where(mask.reshape(w.shape), w, 0).astype(np.float32)
    vals, idx = compress_fp32_nm(w, n, m)
    layer = fp32_layer("l", ("w", w.shape, "float32"), f"{n}:{m}", None)
    assert np.array_equal(decode_rows(layer, {"values": vals, "nm_index": idx}, slice(None)), w)


def test_fp32_nm_refuses_a_dense_block():
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_fp32_nm(np.ones((1, 4), np.float32), 2, 4)


def test_presets_builtin_user_file_and_errors(tmp_path):
    u280 = presets.load("u280")
    vhk = presets.load("vhk158")
    # the sustained weight bandwidth follows from the preset's numbers
    assert u280.hbm_bytes_per_cycle(32) == pytest.approx(460e9 * 0.7 / 225e6)
    assert vhk.macs_per_cycle("mv") == 64 * 16 * 4
    mine = dict(u280.to_json(), name="mine", clock_mhz=300)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(mine))
    assert presets.load(str(path)).clock_hz == 300e6
    bad = dict(mine)
    del bad["mv"]
    path.write_text(json.dumps(bad))
    with pytest.raises(presets.PresetError, match="field 'mv' is missing"):
        presets.load(str(path))
    with pytest.raises(presets.PresetError, match="no such file"):
        presets.load(str(tmp_path / "nope.json"))
    path.write_text("{")
    with pytest.raises(presets.PresetError, match="not JSON"):
        presets.load(str(path))


def test_target_fpga_needs_a_preset():
    from bitsmith.backends.fpga import FPGAOptionError, resolve_preset
    with pytest.raises(FPGAOptionError, match="preset=FILE.json"):
        resolve_preset("fpga", {"preset": ""})
