"""Fuzzing saved artifacts: any mutation loads to the original's exact results or raises ArtifactError.

One tiny random Llama is compiled once per session for each CPU target (reference, tvm-llvm,
lut-cpu with a quantized model) and saved. Each hypothesis example copies one artifact and
mutates it: bit flips, truncation, appended bytes, manifest field edits (with and without a
recomputed ``manifest_sha256``, so the schema and consistency checks behind the self-hash are
reached), files added, removed, renamed or swapped, and files or directories replaced by symbolic
links to files inside or outside the directory (outside: an identical copy too). Then
``bitsmith.load(copy)(ids)`` must give results bit-identical to the original's, or raise
ArtifactError; any other exception fails, and so does a crash. Symbolic links must always be
refused, even to identical bytes. A second test rewrites one or two values of a target JSON file
(tvm ``plan.json``, lut ``program.json`` / ``host/plan.json``: a random int or string, a dropped
key, a value of another type) and re-hashes it in the manifest, so the backend's decoder must
refuse what the hash check no longer catches. Each case starts with no native-code grants
(``native_loader.reset_grants``), as a fresh process would.

Native targets load and run in a worker subprocess (one per target, fed case after case), so
a crash in native code is seen as the worker dying on that case. ``--hypothesis-profile stress``
runs many more examples; set BITSMITH_FUZZ_REPORT=file.json to get the outcome counts.

Manifest edits behind a recomputed self-hash are limited to what the loader can detect: a
re-hashed manifest is, to the loader, a valid artifact, so an edit that makes a different but
valid model (a changed IR literal, a different option value) is not a corruption it could
refuse. Those fields are edited only in ways that break their type or presence.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

from bitsmith.runtime.manifest import HASH_FIELD, MANIFEST, manifest_hash  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(7).integers(1, 128, (2, 5)).tolist()
TARGETS = {"reference": {}, "tvm-llvm": {}, "lut-cpu": {"quant": "rtn-int4", "group_size": 32}}
# default profile: a few dozen cases per target (~1 min in all, the target-JSON rewrites included);
# the stress profile's count otherwise
EXAMPLES = 24 if settings.default.max_examples <= 100 else settings.default.max_examples
REWRITE_EXAMPLES = 20 if settings.default.max_examples <= 100 else settings.default.max_examples

WORKER = r"""
import hashlib, inspect, json, sys, traceback
import numpy as np
import bitsmith
from bitsmith.errors import ArtifactError
kw = {"trust_native_code": True} if "trust_native_code" in inspect.signature(bitsmith.load).parameters else {}
ids = np.array(json.loads(sys.argv[1]), dtype=np.int64)
from bitsmith.backends import native_loader
for line in sys.stdin:
    native_loader.reset_grants()  # each case judged as a fresh process would (no grants from earlier cases)
    try:
        out = np.asarray(bitsmith.load(json.loads(line), **kw)(ids))
        res = {"outcome": "ran", "digest": hashlib.sha256(out.tobytes()).hexdigest() + f"{out.dtype}{out.shape}"}
    except ArtifactError as e:
        res = {"outcome": "ArtifactError", "detail": str(e)[-300:]}
    except BaseException as e:
        res = {"outcome": "other", "detail": traceback.format_exc()[-3000:]}
    print(json.dumps(res), flush=True)
"""


class Worker:
    """A subprocess that loads and runs artifact after artifact; dies -> the case crashed it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(IDS)], cwd=ROOT, env=self.env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self, path: Path) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        self.proc.stdin.write(json.dumps(str(path)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"worker exited with status {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _run_in_process(path: Path) -> dict[str, Any]:
    import inspect
    import traceback

    import bitsmith
    from bitsmith.errors import ArtifactError
    from bitsmith.backends import native_loader
    kw = {"trust_native_code": True} if "trust_native_code" in inspect.signature(bitsmith.load).parameters else {}
    native_loader.reset_grants()
    try:
        out = np.asarray(bitsmith.load(str(path), **kw)(np.array(IDS, dtype=np.int64)))
        return {"outcome": "ran", "digest": hashlib.sha256(out.tobytes()).hexdigest() + f"{out.dtype}{out.shape}"}
    except ArtifactError as e:
        return {"outcome": "ArtifactError", "detail": str(e)[-300:]}
    except Exception:
        return {"outcome": "other", "detail": traceback.format_exc()[-3000:]}


class Target:
    def __init__(self, name: str, path: Path, worker: Worker | None) -> None:
        self.name, self.path, self.worker = name, path, worker
        self.files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        self.dirs = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir())
        self.original = self.run(path)
        assert self.original["outcome"] == "ran", self.original

    def run(self, path: Path) -> dict[str, Any]:
        return self.worker.run(path) if self.worker else _run_in_process(path)


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Target]:
    import bitsmith
    from bitsmith.testing.hf_configs import make_model
    base = tmp_path_factory.mktemp("fuzz")
    env = {**os.environ, "BITSMITH_TRUST_STORE": str(base / "trust-store.json"), "PYTHONPATH": str(ROOT)}
    os.environ.setdefault("BITSMITH_TRUST_STORE", str(base / "trust-store.json"))
    model = make_model("llama")
    out = {}
    for name, kw in TARGETS.items():
        bitsmith.compile(model, target=name, **kw).save(str(base / name))
        out[name] = Target(name, base / name, None if name == "reference" else Worker(env))
    yield out
    for t in out.values():
        if t.worker:
            t.worker.close()


OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    yield
    summary = {t: dict(c) for t, c in sorted(OUTCOMES.items())}
    print(f"\nartifact fuzz outcomes per target: {json.dumps(summary)}")
    if os.environ.get("BITSMITH_FUZZ_REPORT"):
        Path(os.environ["BITSMITH_FUZZ_REPORT"]).write_text(json.dumps(summary, indent=1) + "\n")


# --- mutations --------------------------------------------------------------------------------

ODD_VALUES = [None, True, False, 0, -1, 1, 2 ** 64, 0.5, "", "x", "../../etc/passwd", [], {}, [0], {"k": 1}]
SHAPE_ONLY = ("ir", "options")  # a changed value there may be a valid, different model (module doc)


def _parent_of(doc: Any, path: tuple) -> tuple[Any, Any]:
    """(container, key) of the leaf at ``path`` (a tuple of keys and indices from ``_paths``)."""
    *parents, key = path
    for k in parents:
        doc = doc[k]
    return doc, key


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _edit_manifest(root: Path, pick: int, how: str, odd: Any, resign: bool) -> None:
    file = root / MANIFEST
    try:  # an earlier mutation may have broken, moved or linked it: then there is nothing to edit
        manifest = json.loads(file.read_bytes()) if file.is_file() and not file.is_symlink() else None
    except ValueError:
        manifest = None
    paths = [p for p in _paths(manifest) if p] if isinstance(manifest, dict) else []
    if not paths:
        return
    path = paths[pick % len(paths)]
    parent, key = _parent_of(manifest, path)
    value = parent[key]
    free = path[0] not in SHAPE_ONLY or not resign
    if how == "delete":
        del parent[key]
    elif how == "add" and isinstance(value, dict):
        value["zz_unknown"] = 1
    elif how == "nudge" and free and isinstance(value, int) and not isinstance(value, bool):
        parent[key] = value + 1
    elif how == "nudge" and free and isinstance(value, str) and value:
        i = pick % len(value)
        parent[key] = value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:]
    elif free or type(odd) is not type(value):  # shape-only fields: only values of another type
        parent[key] = odd
    else:
        parent[key] = None
    if resign:
        manifest[HASH_FIELD] = manifest_hash(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


TARGET_JSON = ("target/plan.json", "target/lut/program.json", "target/host/plan.json")
VALUE_ONLY = ("scalar",)  # a plan constant's value: a changed number is a valid, different model (module doc)


def _rewrite_target_json(root: Path, pick: int, leaf: int, how: str, number: int, text: str, odd: Any) -> None:
    """Edits one value of a target JSON file (plan.json, lut/program.json) and re-hashes it in the
    manifest (files[name] and manifest_sha256), so the edit reaches the backend's decoder."""
    names = [n for n in TARGET_JSON if (root / n).is_file() and not (root / n).is_symlink()]
    manifest_file = root / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_bytes()) if manifest_file.is_file() else None
        doc = json.loads((root / names[pick % len(names)]).read_bytes()) if names else None
    except ValueError:
        return
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or doc is None:
        return
    name = names[pick % len(names)]
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return
    path = paths[leaf % len(paths)]
    parent, key = _parent_of(doc, path)
    value = parent[key]
    value_only = any(p in VALUE_ONLY for p in path if isinstance(p, str))
    if how == "drop":
        del parent[key]
    elif how == "int" and not (value_only and isinstance(value, (int, float))):
        parent[key] = number
    elif how == "str":
        parent[key] = text
    else:  # a value of another type
        parent[key] = odd if type(odd) is not type(value) else None
    data = json.dumps(doc).encode()
    (root / name).write_bytes(data)
    if isinstance(manifest["files"].get(name), dict):
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest[HASH_FIELD] = manifest_hash(manifest)
        manifest_file.write_text(json.dumps(manifest, indent=1))


rewrite = st.tuples(st.just("rewrite"), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6),
                    st.sampled_from(["int", "str", "drop", "type"]),
                    st.one_of(st.integers(-3, 300), st.integers(-2 ** 70, 2 ** 70)),
                    st.text(max_size=12), st.sampled_from(ODD_VALUES))

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10 ** 6), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 6), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.integers(0, 10 ** 6), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("manifest"), st.integers(0, 10 ** 6), st.sampled_from(["delete", "add", "nudge", "odd"]),
              st.sampled_from(ODD_VALUES), st.booleans()),
    st.tuples(st.just("add"), st.sampled_from(["extra.bin", "target/extra.so", "target/kernels/zz.so",
                                               "target/lut/more.bin", "weights.safetensors.bak"]),
              st.binary(max_size=64)),
    st.tuples(st.just("remove"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("rename"), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)),
    st.tuples(st.just("link"), st.integers(0, 10 ** 6), st.sampled_from(["inside", "outside-same", "outside-other"])),
    st.tuples(st.just("link-dir"), st.integers(0, 10 ** 6)),
)


def _apply(t: Target, root: Path, outside: Path, m: tuple) -> bool:
    """Applies mutation ``m`` to the copy ``root``; returns whether it made a symbolic link."""
    kind = m[0]
    live = [f for f in t.files if (root / f).is_file() and not (root / f).is_symlink()]
    if not live:
        return False
    f = root / live[m[1] % len(live)] if kind not in ("manifest", "add", "rewrite") else None
    if kind == "flip":
        data = bytearray(f.read_bytes())
        if data:
            data[int(m[2] * len(data))] ^= 1 << m[3]
            f.write_bytes(bytes(data))
    elif kind == "truncate":
        f.write_bytes(f.read_bytes()[:int(m[2] * f.stat().st_size)])
    elif kind == "append":
        with open(f, "ab") as fh:
            fh.write(m[2])
    elif kind == "manifest":
        _edit_manifest(root, m[1], m[2], m[3], m[4])
    elif kind == "rewrite":
        _rewrite_target_json(root, *m[1:])
    elif kind == "add":
        (root / m[1]).parent.mkdir(parents=True, exist_ok=True)
        (root / m[1]).write_bytes(m[2])
    elif kind == "remove":
        f.unlink()
    elif kind == "rename":
        other = root / live[m[2] % len(live)]
        if other == f:
            f.rename(f.with_name(f.name + ".moved"))
        else:  # swap two files
            tmp = f.with_name(f.name + ".swap")
            f.rename(tmp)
            other.rename(f)
            tmp.rename(other)
    elif kind == "link":
        if m[2] == "inside":
            target = root / live[(m[1] + 1) % len(live)]
        else:
            target = outside / f"{m[1]}-{f.name}"
            target.write_bytes(f.read_bytes() if m[2] == "outside-same" else b"outside bytes")
        f.unlink()
        f.symlink_to(target)
        return True
    elif kind == "link-dir":
        dirs = [d for d in t.dirs if (root / d).is_dir() and not (root / d).is_symlink()]
        if not dirs:
            return False
        d = root / dirs[m[1] % len(dirs)]
        copy = outside / f"dir-{len(list(outside.iterdir()))}"
        shutil.copytree(d, copy, symlinks=True)
        shutil.rmtree(d)
        d.symlink_to(copy, target_is_directory=True)
        return True
    return False


def _check_case(name: str, kind: str, t: Target, mutations: list[tuple]) -> None:
    with tempfile.TemporaryDirectory(prefix="bitsmith-fuzz-") as tmp:
        root, outside = Path(tmp) / "art", Path(tmp) / "outside"
        shutil.copytree(t.path, root)
        outside.mkdir()
        linked = False
        for m in mutations:
            linked |= _apply(t, root, outside, m)
        got = t.run(root)
    outcome = "identical" if got.get("digest") == t.original["digest"] else got["outcome"]
    OUTCOMES[f"{name}{kind}"][outcome] += 1
    assert outcome in ("identical", "ArtifactError"), f"{mutations}: {got}"
    if linked:
        assert outcome == "ArtifactError", f"a symbolic link was followed: {mutations}"


@pytest.mark.parametrize("name", list(TARGETS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_artifact_loads_identically_or_raises_artifact_error(targets, name, mutations):
    _check_case(name, "", targets[name], mutations)


@pytest.mark.parametrize("name", [n for n in TARGETS if n != "reference"])  # the reference target has no target JSON
@settings(max_examples=REWRITE_EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(rewrite, min_size=1, max_size=2))
def test_rewritten_target_json_loads_identically_or_raises_artifact_error(targets, name, edits):
    """One or two values of plan.json / lut/program.json replaced (a random int or string, a dropped
    key, a value of another type) and the file re-hashed in the manifest: the backend's decoder,
    not the hash check, must refuse it (or the result is unchanged)."""
    _check_case(name, "/rewrite", targets[name], edits)


def test_lut_program_isa_dropped_or_swapped_is_refused(targets):
    """program.json's ``isa`` dropped (read as the AVX2 build of old artifacts) or swapped for
    another build this CPU runs, while lutexec.so stays: the library's own ``lut_isa()`` disagrees,
    and that is a broken artifact (ArtifactError), not a build error (found by the fuzz above in CI)."""
    from bitsmith.backends.lut import native
    t = targets["lut-cpu"]
    names = [n for n in TARGET_JSON if (t.path / n).is_file()]
    pick = names.index("target/lut/program.json")
    doc = json.loads((t.path / names[pick]).read_bytes())
    leaf = [p for p in _paths(doc) if p].index(("isa",))
    cases = [("rewrite", pick, leaf, "drop", 0, "", None)]
    cases += [("rewrite", pick, leaf, "str", 0, other, None) for other in native.ENGINE_ISAS
              if other != doc["isa"] and native.cpu_runs(other)]
    for case in cases:
        _check_case("lut-cpu", "/isa", t, [case])
