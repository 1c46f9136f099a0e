"""Building, storing and loading the C fast executor (native/lutexec.c).

The library is compiled once per process at compile time with a portable AVX2 build
(x86-64-v3: ``-mavx2 -mfma``; ``SPEC`` records the cpuinfo flags that implies), its bytes go
into the artifact, and loading hands those (already sha256-checked and trusted) bytes to
``native_loader`` for ``ctypes``. A CPU without AVX2 gets ``None`` from ``load_library`` and
the caller falls back to the reference executor.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from typing import Any

import numpy as np

from ...errors import BitsmithError
from .. import native_loader
from .codegen import LayerProgram
from .validate import ERRORS, StreamError, check_operands, refusal  # noqa: F401 - StreamError, ERRORS re-exported

SOURCE = "lutexec.c"
LIBRARY_FILE = "lut/lutexec.so"
# threads=0 (auto) runs smaller layer calls on one thread. With OpenMP the bar is high: its
# region costs more than it saves on small layers, and between tvm-llvm host kernels OpenMP's
# spinning threads and TVM's fight for the cores (SmolLM2 bitmod-w4 decode on 2 cores: 8 tok/s
# with every layer split over OpenMP vs ~32 serial). On the host's TVM pool, whose threads are
# awake between kernels, splitting even SmolLM2's smallest layers pays (~31-34 tok/s serial,
# more split at 2^16: 36.1 in benchmarks/results/cpu_decode.md; same machine, noisy).
AUTO_THREADS_MACS = 1 << 22
AUTO_THREADS_MACS_POOL = 1 << 16
CFLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
ABI_VERSION = 2   # lut_abi_version() of native/lutexec.c that this binding speaks
# What CFLAGS let gcc emit: -mavx2 implies AVX and SSE3..SSE4.2; -mfma adds FMA.
SPEC = native_loader.NativeSpec("lut-engine", "x86_64", "x86-64-v3",
                                ("avx", "avx2", "fma", "pni", "ssse3", "sse4_1", "sse4_2"))


class NativeBuildError(BitsmithError):
    """The C executor could not be compiled (no gcc, or a compiler error)."""


def source_text() -> bytes:
    return resources.files(__package__).joinpath("native", SOURCE).read_bytes()


def cpu_has_avx2() -> bool:
    """Whether this CPU can run the engine (every flag of ``SPEC``)."""
    return native_loader.host_arch() == SPEC.arch and set(SPEC.features) <= native_loader.cpu_features()


def build_library(source: bytes | None = None) -> bytes:
    """The shared library's bytes, compiled from ``source`` (default: the packaged C file) once
    per process, and granted to ``native_loader`` (built here) on every call."""
    data = _compile(source_text() if source is None else source)
    native_loader.grant_built(data, SPEC)
    return data


@functools.lru_cache(maxsize=4)
def _compile(source: bytes) -> bytes:
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise NativeBuildError("target lut-cpu needs a C compiler (gcc) at compile time to build its executor")
    with tempfile.TemporaryDirectory(prefix="bitsmith-lut-") as d:
        src, out = os.path.join(d, SOURCE), os.path.join(d, "lutexec.so")
        with open(src, "wb") as f:
            f.write(source)
        # relative names from inside the temporary directory, and its name mapped away, so the
        # random directory name reaches no byte of the library (artifacts are deterministic)
        proc = subprocess.run([cc, *CFLAGS, f"-ffile-prefix-map={d}=.", SOURCE, "-o", "lutexec.so", "-lm"],
                              capture_output=True, text=True, cwd=d)
        if proc.returncode:
            raise NativeBuildError(f"building the LUT executor failed ({cc} {' '.join(CFLAGS)}):\n{proc.stderr[-2000:]}")
        with open(out, "rb") as f:
            return f.read()


class NativeExecutor:
    """ctypes binding of ``lut_plan`` (validate once per program) and ``lut_exec`` (run)."""

    def __init__(self, library: bytes) -> None:
        self.sha256 = hashlib.sha256(library).hexdigest()
        self._lib = native_loader.load(library, LIBRARY_FILE, ctypes.CDLL)
        abi = int(self._lib.lut_abi_version())
        if abi != ABI_VERSION:
            raise NativeBuildError(f"lutexec.so speaks ABI {abi}, this runtime speaks {ABI_VERSION}; "
                                   "recompile the artifact with this bitsmith")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._plan = self._lib.lut_plan
        self._plan.argtypes = [p, i64, i64, i64, p, i64, p, p]
        self._plan.restype = i64
        self._run_stream = self._lib.lut_exec
        self._run_stream.argtypes = [p, p, i64, i64, p, p, p, p, i64, p, ctypes.c_int, ctypes.c_int, p]
        self._run_stream.restype = i64
        self._plans: dict[int, tuple] = {}

    def plan(self, program: LayerProgram) -> "_BoundStream":
        """Validates a program once and binds its operands (cached while its arrays are read-only:
        writable arrays could change under the validated plan, so they are re-validated per call)."""
        key = id(program.stream)
        hit = self._plans.get(key)
        if hit is not None and hit.matches(program):
            return hit
        check_operands(program)  # ISAError (bad magic, version) or StreamError before the C checks
        pos = np.zeros(program.stream.size, np.int64)
        counts = np.zeros(2, np.int64)
        err = self._plan(program.stream.ctypes.data, program.stream.size, program.weights.size,
                         program.params.size, program.outliers.ctypes.data, program.outliers.size,
                         pos.ctypes.data, counts.ctypes.data)
        if err:
            raise refusal(err)
        bound = _BoundStream(self._run_stream, program, pos, int(counts[0]), int(counts[1]))
        if not (program.stream.flags.writeable or program.outliers.flags.writeable):
            self._plans[key] = bound
        return bound

    def run(self, program: LayerProgram, x: np.ndarray, int8_tables: bool = True, threads: int = 0,
            out: np.ndarray | None = None, launcher: int | None = None) -> np.ndarray:
        """y [M, N] for x [M, K]; written into ``out`` (float32, C-contiguous [M, N]) when given.
        ``launcher``: address of a TVMBackendParallelLaunch-compatible function to run the
        parallel parts on (None: OpenMP)."""
        return self.plan(program)(x, int8_tables, threads, out, launcher)


class _BoundStream:
    """A validated program with its operand pointers resolved: a call costs one ctypes call plus
    the checks on x and out (this runs ~200 times per decoded token of SmolLM2)."""

    def __init__(self, fn: Any, program: LayerProgram, pos: np.ndarray, ntables: int, nsegs: int) -> None:
        head = program.header
        self.program, self.pos = program, pos  # keep the arrays alive with their pointers
        self.n, self.kpad, self.k = head.out_features, head.padded_in, program.in_features
        self.sizes = (program.weights.size, program.params.size)
        self.macs_per_row = head.out_features * head.padded_in
        self._call = functools.partial(fn, program.stream.ctypes.data, pos.ctypes.data, ntables, nsegs,
                                       program.weights.ctypes.data, program.params.ctypes.data,
                                       program.outliers.ctypes.data)

    def matches(self, program: LayerProgram) -> bool:
        p = self.program
        return p.stream is program.stream and p.outliers is program.outliers and p.weights is program.weights \
            and p.params is program.params and self.sizes == (program.weights.size, program.params.size) \
            and not (program.stream.flags.writeable or program.outliers.flags.writeable)

    def __call__(self, x: np.ndarray, int8_tables: bool, threads: int, out: np.ndarray | None,
                 launcher: int | None = None) -> np.ndarray:
        m = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.k:
            raise StreamError(f"LUT layer takes x of shape [M, {self.k}], got {x.shape}")
        if x.shape[1] == self.kpad and x.dtype == np.float32 and x.flags.c_contiguous:
            xp = x
        else:
            xp = np.zeros((m, self.kpad), np.float32)
            xp[:, :x.shape[1]] = x
        if out is None:
            y = np.zeros((m, self.n), np.float32)  # rows no STORE writes are 0 (spec)
        else:
            if out.shape != (m, self.n) or out.dtype != np.float32 or not out.flags.c_contiguous:
                raise StreamError(f"LUT executor output must be C-contiguous float32 {(m, self.n)}, "
                                  f"got {out.dtype} {out.shape}"
                                  f"{'' if out.flags.c_contiguous else ' (not C-contiguous)'}")
            if np.may_share_memory(out, xp):
                raise StreamError("LUT executor output must not overlap its input")
            y = out
            y.fill(0.0)
        if m == 0:
            return y
        if threads == 0 and m * self.macs_per_row < (AUTO_THREADS_MACS_POOL if launcher else AUTO_THREADS_MACS):
            threads = 1
        err = self._call(xp.ctypes.data, m, y.ctypes.data, 0 if int8_tables else 1, int(threads), launcher)
        if err:
            raise StreamError(f"LUT executor failed: {ERRORS.get(err & 0xFF, 'error')}")
        return y


def tvm_parallel_launcher() -> int | None:
    """Address of TVMBackendParallelLaunch in this process (TVM's runtime loads it globally), or None."""
    try:
        return ctypes.cast(ctypes.CDLL(None).TVMBackendParallelLaunch, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None


def load_library(library: bytes) -> NativeExecutor | None:
    """The executor for these library bytes, or None on a CPU without AVX2/FMA."""
    if not cpu_has_avx2():
        return None
    return NativeExecutor(library)
