"""The capture cache (bitsmith/frontend/capture_cache.py): a GGUF model compiled again is served
from $BITSMITH_CACHE_DIR/captures without torch, and what it serves is the capture itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bitsmith
from bitsmith.frontend import capture, capture_cache
from bitsmith.frontend.captured import model_name
from bitsmith.ir import print_module
from gguf_files import write_tiny_llama

MIX = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q4_1",
       "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1", "token_embd": "Q8_0"}
IDS = np.array([[1, 5, 9, 2, 7, 3]], dtype=np.int64)


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "tiny.gguf", MIX)


def _entries() -> list[str]:
    root = capture_cache.cache_dir()
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_second_capture_is_served_from_the_cache_and_equals_the_first(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    first = capture(str(gguf_file))
    assert len(_entries()) == 1 and "export" in first.seconds
    second = capture(str(gguf_file))
    assert "cached_capture" in second.seconds  # not exported again
    assert print_module(second.module) == print_module(first.module)  # tensors by sha256 too
    assert second.module.tensors == first.module.tensors
    assert (second.tokenizer_json, second.bos_token_id, second.eos_token_id, second.chat_template, second.passes) \
        == (first.tokenizer_json, first.bos_token_id, first.eos_token_id, first.chat_template, first.passes)
    assert sorted(second.source_weights) == sorted(first.source_weights)
    for name in first.source_weights:  # the same blocks, found again by name (tied lm_head included)
        a, b = first.source_weights[name], second.source_weights[name]
        assert np.array_equal(a.codes, b.codes) and np.array_equal(a.scales, b.scales)


def test_cached_compile_computes_what_a_fresh_one_does(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    fresh = bitsmith.compile(str(gguf_file), target="reference", quant="gguf")
    cached = bitsmith.compile(str(gguf_file), target="reference", quant="gguf")
    assert "cached_capture" in cached.timings["seconds"]
    np.testing.assert_array_equal(np.asarray(cached(IDS)), np.asarray(fresh(IDS)))
    assert print_module(cached.module) == print_module(fresh.module)


def test_another_file_or_a_damaged_entry_is_captured_again(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    capture(str(gguf_file))
    (entry,) = _entries()
    other = write_tiny_llama(tmp_path / "other.gguf", MIX, seed=1)  # same header, other weights
    assert capture_cache.capture_key(other, "") != capture_cache.capture_key(gguf_file, "")
    assert capture_cache.capture_key(gguf_file, model_name(str(gguf_file))) == entry
    (capture_cache.cache_dir() / entry / "tensors.safetensors").write_bytes(b"damaged")
    again = capture(str(gguf_file))
    assert "export" in again.seconds  # captured again, not read from the damaged entry
    assert "cached_capture" in capture(str(gguf_file)).seconds  # and the entry rewritten whole


def test_a_renamed_copy_records_its_own_name(gguf_file, tmp_path, monkeypatch):
    """The capture records the file's name: the same bytes under another name are another entry,
    so an artifact's bytes never depend on what was compiled before it."""
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    first = capture(str(gguf_file))
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(gguf_file.read_bytes())
    second = capture(str(renamed))
    assert "export" in second.seconds and len(_entries()) == 2
    names = [dict(m.module.attrs)["model_name"] for m in (first, second)]
    assert names == ["tiny.gguf", "renamed.gguf"], names


@pytest.mark.slow  # two fresh interpreters, one of them importing torch and transformers
def test_a_cached_capture_imports_neither_torch_nor_transformers(gguf_file, tmp_path):
    env = {**os.environ, "BITSMITH_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = ("import sys; from bitsmith.frontend import capture; c = capture(sys.argv[1]); "
            "print(sorted(c.seconds), 'torch' in sys.modules, 'transformers' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code, str(gguf_file)], env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    assert runs[0].stdout.split()[-2:] == ["True", "True"]
    assert runs[1].stdout.strip() == "['cached_capture'] False False"


def test_old_entries_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_path / "cache"))
    root = capture_cache.cache_dir()
    for i in range(capture_cache.KEEP_ENTRIES + 2):
        (root / f"old{i}").mkdir(parents=True)
        os.utime(root / f"old{i}", (i, i))  # old5 is the newest
    captured = capture_cache.CapturedModel(_tiny_module())
    capture_cache.store("new", captured, None)
    kept = sorted(p.name for p in root.iterdir())
    assert kept == sorted(["new"] + [f"old{i}" for i in range(3, capture_cache.KEEP_ENTRIES + 2)])
    assert capture_cache.load("new", tmp_path / "unused.gguf").module == captured.module


def _tiny_module():
    """A module with one tensor, so the safetensors file is not empty."""
    from bitsmith.ir import TensorTable, parse_module
    table = TensorTable({"w": np.arange(4, dtype=np.float32)})
    text = ("module {\n" + f'  tensor "w" : f32[4] sha256 "{table.info("w").sha256}"\n'
            "  func @main(%x: f32[4]) {\n    %w = constant() {name = \"w\"} : f32[4]\n"
            "    %a = add(%x, %w) : f32[4]\n    return %a\n  }\n}\n")
    return parse_module(text, table)
