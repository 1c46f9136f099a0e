"""Native-code trust: the local trust store, the trust decision of ``bitsmith.load``, the one
native loader (granted bytes only, CPU check, private copies), the digest-checked kernel cache.

The oracle for every run is the reference interpreter on the same module; the trust store of
each test is a fresh file (conftest gives the session one, tests that need "another machine"
point BITSMITH_TRUST_STORE at an empty path).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import bitsmith  # noqa: E402
from artifact_helpers import VOCAB, edit_manifest, read_json, tiny_causal_lm_module  # noqa: E402
from bitsmith.backends import native_loader  # noqa: E402
from bitsmith.backends.base import backend_for_target  # noqa: E402
from bitsmith.cli import main  # noqa: E402
from bitsmith.errors import ArtifactError  # noqa: E402
from bitsmith.ir import run_function  # noqa: E402
from bitsmith.runtime import CompiledModel, LanguageModelInfo, trust  # noqa: E402
from bitsmith.runtime.trust import TrustStoreError, UntrustedNativeCodeError  # noqa: E402

ARGS = [np.array([[2, 3, 1]], dtype=np.int64), np.array([[0, 1, 2]], dtype=np.int64),
        np.zeros((1, 0, 4), np.float32), np.zeros((1, 0, 4), np.float32)]


def _tiny_lm_llvm(tmp_cache: Path, monkeypatch) -> CompiledModel:
    from artifact_helpers import tiny_tokenizer_json
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(tmp_cache))
    module = tiny_causal_lm_module()
    backend = backend_for_target("tvm-llvm")
    options = backend.option_defaults("tvm-llvm")
    exe = backend.build(module, "tvm-llvm", options)
    lm = LanguageModelInfo(tiny_tokenizer_json(), None, VOCAB["<eos>"])
    return CompiledModel(module, exe, "tvm-llvm", options, lm)


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture
def built(tmp_path: Path, kernel_cache: Path, monkeypatch) -> tuple[CompiledModel, Path]:
    """A tvm-llvm language model compiled and saved on "this machine" (the session store)."""
    cm = _tiny_lm_llvm(kernel_cache, monkeypatch)
    cm.save(tmp_path / "art")
    return cm, tmp_path / "art"


@pytest.fixture
def other_machine(built, tmp_path: Path, monkeypatch) -> Path:
    """After ``built``: an empty trust store and a process that built nothing, as on a machine
    that did not build the artifact."""
    store = tmp_path / "other-config" / "trusted_native.json"
    monkeypatch.setenv(trust.STORE_ENV, str(store))
    monkeypatch.setattr(native_loader, "_grants", {})
    return store


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Records the sha256 of every library the native loader actually opens."""
    seen: list[str] = []
    real = native_loader.load

    def spy(data, name, opener):
        def recording(path):
            seen.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            return opener(path)
        return real(data, name, recording)

    monkeypatch.setattr(native_loader, "load", spy)
    return seen


def _oracle(cm: CompiledModel) -> list[np.ndarray]:
    return run_function(cm.module, "main", ARGS)


def _assert_runs_like_the_interpreter(cm: CompiledModel) -> None:
    for got, ref in zip(cm.run("main", ARGS), _oracle(cm)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)  # one-hot rows: exact up to fp32 rounding


def _native_digests(path: Path) -> dict[str, str]:
    m = read_json(path)
    return {name: m["files"][name] if isinstance(m["files"][name], str) else m["files"][name]["sha256"]
            for name in m["native"]}


# --- the trust decision ----------------------------------------------------------------------

def test_manifest_declares_every_kernel_library_with_its_isa(built):
    cm, path = built
    m = read_json(path)
    libs = sorted(n for n in m["files"] if n.endswith(".so"))
    assert libs and sorted(m["native"]) == libs
    target = __import__("bitsmith.backends.tvm.llvm_target", fromlist=["make_target"]).make_target({"mcpu": "host"})
    expected = native_loader.llvm_spec("tvm-llvm-kernel", target)
    assert expected.cpu not in ("host", "native", "")  # "host" is resolved to the concrete LLVM CPU
    from bitsmith.backends.tvm import native_step
    for name, rec in m["native"].items():  # kernels, and the step driver with its own (baseline) ISA
        want = native_step.SPEC if name.endswith(native_step.DRIVER_FILE) else expected
        assert native_loader.NativeSpec.from_json(rec) == want
    plan = json.loads((path / "target" / "plan.json").read_text())
    assert plan["isa"] == expected.to_json()


def test_saved_here_loads_from_the_store(built, loads):
    _, path = built
    loads.clear()
    assert set(_native_digests(path).values()) <= set(trust.trusted())
    cm = bitsmith.load(str(path))
    _assert_runs_like_the_interpreter(cm)
    assert sorted(loads) == sorted(_native_digests(path).values())


def test_foreign_artifact_is_refused_then_trusted_three_ways(built, other_machine, loads, capsys):
    _, path = built
    names = sorted(_native_digests(path))
    with pytest.raises(UntrustedNativeCodeError) as err:
        bitsmith.load(str(path))
    msg = str(err.value)
    assert isinstance(err.value, ArtifactError)
    # the message names the first few libraries (kernels and the step driver) and counts the rest
    shown = min(len(names), trust._SHOWN)
    assert sum(n in msg for n in names) == shown and "bitsmith trust" in msg and "trust_native_code=True" in msg
    assert len(names) <= trust._SHOWN or f"and {len(names) - trust._SHOWN} more" in msg
    assert loads == []  # refused before any native byte was loaded
    assert not other_machine.exists()  # refusing writes nothing

    _assert_runs_like_the_interpreter(bitsmith.load(str(path), trust_native_code=True))
    assert not other_machine.exists()  # trusting one load is not lasting trust
    cm = bitsmith.load(str(path), trust_native_code=True)
    cm.save(path.parent / "resaved")  # ... nor is saving what a caller trusted once
    assert not set(_native_digests(path).values()) & set(trust.trusted())

    # without a terminal, `bitsmith trust` needs --yes
    capsys.readouterr()
    assert main(["trust", str(path)]) == 2
    assert "--yes" in capsys.readouterr().err
    assert not set(_native_digests(path).values()) & set(trust.trusted())

    assert main(["trust", str(path), "--yes"]) == 0
    out = capsys.readouterr().out
    assert all(n in out and d in out for n, d in _native_digests(path).items())
    assert set(_native_digests(path).values()) <= set(trust.trusted())
    _assert_runs_like_the_interpreter(bitsmith.load(str(path)))


def test_trust_asks_on_a_terminal(built, other_machine, monkeypatch, capsys):
    _, path = built
    answers = iter(["n", "y"])

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert main(["trust", str(path)]) == 1 and trust.trusted() == {}
    assert main(["trust", str(path)]) == 0
    assert set(_native_digests(path).values()) == set(trust.trusted())


def test_cli_run_needs_the_flag_on_another_machine(built, other_machine, capsys):
    _, path = built
    assert main(["run", str(path), "--prompt", "hello", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitsmith: error: untrusted native code") and "--trust-native-code" in err[0]
    assert main(["run", str(path), "--prompt", "hello", "--max-new-tokens", "3", "--trust-native-code"]) == 0
    assert capsys.readouterr().out.strip() == "world"  # NEXT_TOKEN: hello -> world -> <eos>


def test_cli_eval_of_an_artifact_needs_the_flag_on_another_machine(built, other_machine, tmp_path, capsys):
    _, path = built
    text = tmp_path / "t.txt"
    text.write_text("hello world hello world hello world")
    argv = ["eval", str(path), "--text", str(text), "--ctx", "4", "--windows", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitsmith: error: untrusted native code"), err
    assert main(argv + ["--trust-native-code"]) == 0
    assert "ppl" in capsys.readouterr().out


def test_inspect_loads_nothing_and_shows_trust(built, other_machine, monkeypatch, capsys):
    _, path = built

    def refuse(*a, **k):
        raise AssertionError("inspect must not load native code")

    monkeypatch.setattr(native_loader, "load", refuse)
    assert main(["inspect", str(path), "--json", "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    digests = _native_digests(path)
    assert {n: v["sha256"] for n, v in summary["native"].items()} == digests
    assert not any(v["trusted"] for v in summary["native"].values())
    assert main(["inspect", str(path)]) == 0
    assert "UNTRUSTED" in capsys.readouterr().out
    trust.add({d: "test" for d in digests.values()})
    assert main(["inspect", str(path), "--json"]) == 0
    assert all(v["trusted"] for v in json.loads(capsys.readouterr().out)["native"].values())


def test_recorded_isa_this_cpu_lacks_is_refused(built, loads):
    _, path = built
    # a flag builds record (a name that is no flag at all is a damaged record: ArtifactError) that
    # this CPU lacks; xop / fma4 (AMD Bulldozer only) are absent from current Intel and AMD CPUs
    lacking = sorted(native_loader.KNOWN_FLAGS - native_loader.cpu_features())
    if not lacking:
        pytest.skip("this CPU has every flag bitsmith records")
    absent = "xop" if "xop" in lacking else lacking[0]

    def add_feature(m):
        for rec in m["native"].values():
            rec["features"] = sorted(rec["features"] + [absent])

    edit_manifest(path, add_feature)
    with pytest.raises(ArtifactError, match=f"this CPU lacks {absent}") as err:
        bitsmith.load(str(path))
    assert isinstance(err.value.__cause__, native_loader.UnsupportedCPUError)
    assert loads == []  # the loader refused before opening anything


def test_missing_features_are_named(monkeypatch):
    """An x86-64-v4 (AVX-512) library on an AVX2-only CPU (as CI's Zen 3): refused, naming what lacks."""
    import tvm
    v4 = native_loader.llvm_spec("tvm-llvm-kernel", tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"}))
    v3 = native_loader.llvm_spec("tvm-llvm-kernel", tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"}))
    assert "avx512f" in v4.features and "avx2" in v3.features and "avx512f" not in v3.features
    monkeypatch.setattr(native_loader, "cpu_features", lambda: frozenset(v3.features))
    monkeypatch.setattr(native_loader, "host_arch", lambda: "x86_64")
    assert v3.missing() == []
    lacking = sorted(set(v4.features) - set(v3.features))
    assert v4.missing() == lacking
    digest = native_loader.sha256(b"not even a library")
    native_loader.grant(digest, v4, native_loader.TRUSTED_CALLER)
    with pytest.raises(native_loader.UnsupportedCPUError) as err:
        native_loader.load(b"not even a library", "target/kernels/x.so", lambda p: pytest.fail("opened"))
    assert "built for x86_64 x86-64-v4 (" in str(err.value) and f"this CPU lacks {' '.join(lacking)}" in str(err.value)


def test_loader_refuses_bytes_nobody_granted():
    with pytest.raises(native_loader.NativeCodeError, match="neither built in this process nor declared"):
        native_loader.load(b"\x7fELF undeclared " + bytes(16), "target/x.so", lambda p: pytest.fail("opened"))


def test_undeclared_library_in_a_trusted_manifest_is_refused(built, monkeypatch):
    """A manifest that leaves a kernel out of ``native`` cannot slip it past the loader."""
    _, path = built
    monkeypatch.setattr(native_loader, "_grants", {})  # as a fresh process: nothing built here
    edit_manifest(path, lambda m: m["native"].popitem())
    # the manifest's inconsistency: an ArtifactError naming it, not a bare NativeCodeError
    with pytest.raises(ArtifactError, match="native: native library .* neither built in this process nor declared") \
            as info:
        bitsmith.load(str(path))
    assert info.value.path.endswith("manifest.json")
    assert isinstance(info.value.__cause__, native_loader.UndeclaredNativeCodeError)


def test_loader_opens_a_private_copy_of_exactly_the_bytes(tmp_path):
    import os
    import stat
    data = b"payload " + os.urandom(32)
    native_loader.grant_built(data, native_loader.NativeSpec("test", native_loader.host_arch(), "generic"))
    seen = {}

    def opener(p: str):
        st = os.lstat(p)
        seen.update(bytes=Path(p).read_bytes(), mode=stat.S_IMODE(st.st_mode), dir=stat.S_IMODE(os.stat(os.path.dirname(p)).st_mode),
                    path=p, link=stat.S_ISLNK(st.st_mode))
        return "handle"

    assert native_loader.load(data, "x.so", opener) == "handle"
    assert seen["bytes"] == data and seen["mode"] == 0o500 and seen["dir"] == 0o700 and not seen["link"]
    assert not os.path.exists(seen["path"])  # unlinked once opened


# --- the store ----------------------------------------------------------------------------

def test_corrupt_store_is_an_error_not_trust(built, other_machine):
    _, path = built
    other_machine.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"format": trust.STORE_FORMAT, "sha256": ["x"]}),
                 json.dumps({"sha256": {}})):
        other_machine.write_text(text)
        with pytest.raises(TrustStoreError, match=str(other_machine)):
            bitsmith.load(str(path))
        with pytest.raises(TrustStoreError):
            trust.add({"0" * 64: "x"})
        assert other_machine.read_text() == text  # never overwritten


def test_store_location_and_concurrent_atomic_adds(tmp_path, monkeypatch):
    monkeypatch.delenv(trust.STORE_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert trust.store_path() == tmp_path / "xdg" / "bitsmith" / "trusted_native.json"
    monkeypatch.setenv(trust.STORE_ENV, str(tmp_path / "s.json"))
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(64)]
    threads = [threading.Thread(target=trust.add, args=({d: f"n{i}" for d in digests[i::8]},)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(trust.trusted()) == set(digests)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


# --- the kernel cache ---------------------------------------------------------------------

def _build(cache: Path, monkeypatch):
    from bitsmith.backends.tvm import llvm_target
    monkeypatch.setenv("BITSMITH_CACHE_DIR", str(cache))
    return llvm_target.compile_host(tiny_causal_lm_module(), {"mcpu": "host", "threads": 0})


def test_tampered_or_foreign_cache_entries_are_rebuilt(tmp_path, monkeypatch, loads):
    import os
    first = _build(tmp_path, monkeypatch)
    n = len(first.libraries)
    entries = sorted((tmp_path / "tvm").glob("*.so"))
    assert len(entries) == n >= 2
    for key, data in first.libraries.items():  # the bytes kept (and saved) are the bytes hashed and loaded
        assert (tmp_path / "tvm" / f"{key}.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()
    assert sorted(loads) == sorted(hashlib.sha256(d).hexdigest() for d in first.libraries.values())

    warm = _build(tmp_path, monkeypatch)
    assert (warm.info["cache_hits"], warm.info["cache_misses"], warm.info["cache_rejected"]) == (n, 0, 0)

    tampered, digestless, linked = entries[0], entries[1], entries[2] if n > 2 else None
    evil = b"\x7fELF tampered" + bytes(64)
    tampered.write_bytes(evil)
    digestless.with_suffix(".sha256").unlink()
    if linked is not None:
        target = tmp_path / "elsewhere.so"
        target.write_bytes(linked.read_bytes())
        linked.unlink()
        os.symlink(target, linked)
    loads.clear()
    again = _build(tmp_path, monkeypatch)
    bad = 3 if linked is not None else 2
    assert (again.info["cache_hits"], again.info["cache_misses"], again.info["cache_rejected"]) == (n - bad, bad, bad)
    assert hashlib.sha256(evil).hexdigest() not in loads
    assert all(d != evil for d in again.libraries.values())
    for key, data in again.libraries.items():
        so = tmp_path / "tvm" / f"{key}.so"
        assert not so.is_symlink() and so.read_bytes() == data
        assert so.with_suffix(".sha256").read_text().strip() == hashlib.sha256(data).hexdigest()

