"""On-disk cache of compiled kernels, shared by every process of a user.

A compiled kernel is keyed by sha256 of (kernel definition, schedule name and version, target
JSON, TVM version and its libraries): change any of them and the kernel is rebuilt. The
definition is the kernel's TIR text, or, for a kernel built from a ``Recipe`` (every kernel of
the tvm-llvm lowering but qlinear's), the recipe's spec plus ``code_salt()`` (see
``kernel_key`` for why that is complete), so a warm compile keys its kernels without building
any TIR. Each entry
is a shared library ``<key>.so`` and its sha256 in ``<key>.sha256``, each written to a temp
name and renamed, so concurrent compiles never see half a file. A lookup reads the library
once (regular file owned by this user, opened without following links), hashes those bytes
and returns them only when they match the recorded digest: a tampered, half-replaced,
digest-less (older bitsmith) or foreign entry is rebuilt, never loaded, and the bytes returned
are exactly the ones hashed (the caller loads and saves those, never re-reading the path).
Location: ``$BITSMITH_CACHE_DIR/tvm``, else ``~/.cache/bitsmith/tvm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
from importlib import metadata
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import tvm

from ...errors import BitsmithError
from .kernel import KernelDef
from .script_frames import cheap_stacks

Scheduler = Callable[[KernelDef, Any], Any]  # (kdef, tvm target) -> scheduled IRModule


def cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "bitsmith"
    return base / "tvm"


def target_json(target: Any) -> str:
    return json.dumps(target.export(), sort_keys=True, default=str)


_SALT_SOURCES = ("backends/tvm", "ir")  # bitsmith's code a recipe's builder runs (TE rules, dims, types)
_salt: str | None = None


def source_digest(package: Path) -> bytes:
    """sha256 of every .py file under ``package``'s ``_SALT_SOURCES``, names and bytes."""
    h = hashlib.sha256()
    for sub in _SALT_SOURCES:
        for path in sorted((package / sub).rglob("*.py")):
            h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.digest()


def code_salt() -> str:
    """``source_digest`` of bitsmith, TVM's version, the RECORD files of the TVM wheels (the digest
    of every file installed: TVM's Python TE/TIR code a builder runs included) and the names,
    sizes and mtimes of TVM's shared libraries: changes whenever bitsmith's kernel code or the TVM
    install changes. Computed once per process (~60 small files, ~20 ms)."""
    global _salt
    if _salt is None:
        h = hashlib.sha256(b"bitsmith-kernel-code-1\0" + source_digest(Path(__file__).resolve().parents[2]))
        h.update(f"tvm={tvm.__version__}\0".encode())
        for dist in ("apache-tvm", "apache-tvm-ffi"):  # RECORD: the sha256 of every file pip installed
            try:
                h.update((metadata.distribution(dist).read_text("RECORD") or "").encode() + b"\0")
            except metadata.PackageNotFoundError:
                h.update(f"{dist}=-\0".encode())
        for lib in sorted(Path(tvm.__file__).parent.rglob("*.so")):  # a local rebuild of TVM's libraries
            st = lib.stat()
            h.update(f"{lib.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
        _salt = h.hexdigest()
    return _salt


def pass_context_text() -> str:
    """The caller's TVM PassContext (opt level, config, required and disabled passes): a config
    such as ``tirx.disable_assert`` changes the compiled code, so it is part of every key."""
    ctx = tvm.transform.PassContext.current()
    config = sorted((str(k), str(v)) for k, v in ctx.config.items())
    return (f"opt_level={ctx.opt_level} config={config} required={sorted(map(str, ctx.required_pass))} "
            f"disabled={sorted(map(str, ctx.disabled_pass))}")


def kernel_key(kdef: KernelDef, schedule_id: str, target: Any) -> str:
    """The cache key of ``kdef`` compiled with schedule ``schedule_id`` for ``target``.

    Why a recipe key is complete (a hit must never return another kernel): the compiled
    library is a deterministic function of (scheduled TIR, target, TVM + LLVM + linker).
    The scheduled TIR is ``scheduler(builder(*args), target)``: ``builder`` and ``args`` are in
    the spec (args are plain literals compared by an injective text, ``Recipe``), the builder is
    a module-level function of its args alone (no closure; the kernel code reads no
    environment variable or mutable global, only module constants), and its code, every rule and
    scheduler it reaches (``backends/tvm``) and the IR helpers they use (``ir``: dims, dtypes)
    are in ``code_salt()``; ``schedule_id`` names the scheduler, the kind selects its branch,
    the scratch specs are listed; the target is its full JSON; the caller's PassContext is
    listed (``pass_context_text``); TVM's version, installed files (wheel RECORDs) and libraries
    are in the salt. Not in the key (as before recipes): the
    system linker's version. A kernel without a recipe is keyed by its TIR text (the
    definition) and the salt too: its scheduled code comes from hand-written generators in
    ``backends/tvm`` (``matmul_cpu_kernels``, ``qlinear_a8``, ...) whose output the definition
    text does not show (without the salt, an edited generator returned the old kernels from the
    cache until ``SCHEDULE_ID`` was bumped). Tests: tests/test_kernel_cache_key.py (distinct
    kernels, distinct keys; changed salt or schedule misses, for TIR-keyed kernels too).
    """
    salt = code_salt()
    text = "\n".join((kdef.definition(), schedule_id, target_json(target), tvm.__version__, salt, pass_context_text()))
    return hashlib.sha256(text.encode()).hexdigest()


def read_own_file(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file owned by this user (not a link), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_entry(so: Path) -> bytes | None:
    """A cache entry's library bytes if they match its ``.sha256`` file, else None."""
    digest = read_own_file(so.with_suffix(".sha256"))
    data = read_own_file(so)
    if not data or digest is None or hashlib.sha256(data).hexdigest() != digest.decode("ascii", "replace").strip():
        return None
    return data


def write_entry(so: Path, data: bytes) -> None:
    """Writes ``data`` and its digest as one cache entry (each file via temp name + rename)."""
    for path, blob in ((so, data), (so.with_suffix(".sha256"), (hashlib.sha256(data).hexdigest() + "\n").encode())):
        fd, tmp = tempfile.mkstemp(dir=so.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@dataclass
class KernelCache:
    """Compiles through the disk cache; counts hits/misses, rejected entries and compile time."""

    directory: Path = field(default_factory=cache_dir)
    hits: int = 0
    misses: int = 0
    rejected: int = 0   # entries present but not loadable (digest missing or mismatched, foreign)
    compile_seconds: float = 0.0

    def library(self, kdef: KernelDef, scheduler: Scheduler, schedule_id: str, target: Any) -> tuple[str, bytes]:
        """(key, shared-library bytes) of the compiled kernel, compiling on a miss."""
        return self.libraries({"k": kdef}, scheduler, schedule_id, target)["k"]

    def libraries(self, kdefs: Mapping[str, KernelDef], scheduler: Scheduler, schedule_id: str, target: Any,
                  jobs: int | None = None) -> dict[str, tuple[str, bytes]]:
        """Per name of ``kdefs``, (key, library bytes): a hit is read from the cache; a miss is
        scheduled here (Python building TIR, one kernel after another) and handed to a pool of
        ``jobs`` threads (default ``build_jobs()``) for ``tvm.compile`` and the link, so they
        overlap with the next kernel's scheduling and with each other (TVM's FFI releases the GIL,
        the linker is a child process). Each library depends on its own kernel only, so the
        bytes are those of a serial build (tests/test_kernel_cache_key.py)."""
        keys: dict[str, str] = {}
        found: dict[str, bytes | Future] = {}  # key -> library bytes, or the build making them
        workers = max(1, jobs or build_jobs())
        pool: ThreadPoolExecutor | None = None
        try:
            for name, kdef in kdefs.items():
                key = keys[name] = kernel_key(kdef, schedule_id, target)
                if key in found:
                    continue
                path = self.directory / f"{key}.so"
                data = read_entry(path)
                if data is not None:
                    self.hits += 1
                    found[key] = data
                    continue
                if os.path.lexists(path):
                    self.rejected += 1
                self.misses += 1
                t1 = time.perf_counter()
                with cheap_stacks():  # TVMScript's stack walks: see script_frames
                    scheduled = scheduler(kdef, target)
                self.directory.mkdir(parents=True, exist_ok=True)
                if workers == 1:
                    found[key] = self._compile(key, scheduled, target)
                else:  # a worker compiles under the caller's PassContext (it is per thread in TVM)
                    pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="bitsmith-kernel-build")
                    found[key] = pool.submit(self._compile, key, scheduled, target, tvm.transform.PassContext.current())
                self.compile_seconds += time.perf_counter() - t1
            t1 = time.perf_counter()
            done = {k: v.result() if isinstance(v, Future) else v for k, v in found.items()}
            if pool is not None:
                self.compile_seconds += time.perf_counter() - t1
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return {name: (key, done[key]) for name, key in keys.items()}

    def _compile(self, key: str, scheduled: Any, target: Any, context: Any = None) -> bytes:
        with context if context is not None else nullcontext():
            lib = tvm.compile(scheduled, target=target)
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            tmp_path = Path(tmp) / f"{key}.so"
            lib.export_library(str(tmp_path))
            data = tmp_path.read_bytes()  # read once: these bytes are cached, loaded and saved
        write_entry(self.directory / f"{key}.so", data)
        return data


def build_jobs() -> int:
    """Kernels compiled at once on a cold build: ``$BITSMITH_BUILD_JOBS``, else the CPUs this
    process may run on."""
    env = os.environ.get("BITSMITH_BUILD_JOBS", "")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise BitsmithError(f"BITSMITH_BUILD_JOBS must be a whole number >= 1, got {env!r}")
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
