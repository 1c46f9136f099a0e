"""Building, storing and loading the C fast executor (native/lutexec.c).

The library is compiled once per process and instruction set at compile time, its bytes go
into the artifact, and loading hands those (already sha256-checked and trusted) bytes to
``native_loader`` for ``ctypes``. Two builds of the one source (``ENGINE_ISAS``): a portable
AVX2 build (x86-64-v3) and an AVX-512 build (512-bit lookups, two tiles per register), chosen
at compile time from the target's ``mcpu`` (``choose_isa``) and recorded in the artifact (the
manifest's native spec and program.json's ``isa``). A CPU without AVX2 gets ``None`` from
``load_library`` and the caller falls back to the reference executor; an AVX-512 build on a CPU
without AVX-512 is refused with ``UnsupportedCPUError`` naming the missing flags.
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import BitsmithError
from .. import native_loader
from .codegen import LayerProgram
from .validate import ERRORS, StreamError, check_operands, refusal  # noqa: F401 - StreamError, ERRORS re-exported

SOURCE = "lutexec.c"
LIBRARY_FILE = "lut/lutexec.so"
# threads=0 (auto) runs smaller layer calls on one thread. The bar without a host launcher was set
# for OpenMP, whose region cost more than it saved on small layers, and whose spinning threads
# fought TVM's between tvm-llvm host kernels (SmolLM2 bitmod-w4 decode on 2 cores: 8 tok/s with
# every layer split over OpenMP vs ~32 serial); the engine's own pool (lutexec.c) sleeps after a
# short spin, but the bar stays until measured on a quiet machine. On the host's TVM pool, whose
# threads are awake between kernels, splitting even SmolLM2's smallest layers pays (~31-34 tok/s
# serial, more split at 2^16: 36.1 in benchmarks/results/cpu_decode.md; same machine, noisy).
AUTO_THREADS_MACS = 1 << 22
AUTO_THREADS_MACS_POOL = 1 << 16
ABI_VERSION = 2   # lut_abi_version() of native/lutexec.c that this binding speaks
_COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-pthread", "-shared", "-fPIC")
_AVX2_FLAGS = ("avx", "avx2", "fma", "pni", "ssse3", "sse4_1", "sse4_2")  # what -mavx2 -mfma let gcc emit


@dataclass(frozen=True)
class EngineISA:
    """One build of lutexec.c: its gcc flags, the cpuinfo flags they imply (``spec``) and the
    value of the library's ``lut_isa()`` (which checks that the flags reached the code)."""

    name: str
    isa_flags: tuple[str, ...]
    spec: native_loader.NativeSpec
    code: int

    @property
    def cflags(self) -> tuple[str, ...]:
        return (_COMMON_FLAGS[0], *self.isa_flags, *_COMMON_FLAGS[1:])


ENGINE_ISAS: dict[str, EngineISA] = {i.name: i for i in (
    EngineISA("avx2", ("-mavx2", "-mfma"),
              native_loader.NativeSpec("lut-engine", "x86_64", "x86-64-v3", _AVX2_FLAGS), 1),
    EngineISA("avx512", ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"),
              native_loader.NativeSpec("lut-engine", "x86_64", "x86-64-v3+avx512bw",
                                       _AVX2_FLAGS + ("avx512f", "avx512bw", "avx512vl")), 2),
)}
PORTABLE_ISA = "avx2"
TABLES_INT8, TABLES_FP32, TABLES_A8 = 0, 1, 2   # lut_exec_tables' table kinds (native/lutexec.c)
# the portable build's flags and spec under their historical names
CFLAGS = ENGINE_ISAS[PORTABLE_ISA].cflags
SPEC = ENGINE_ISAS[PORTABLE_ISA].spec


class NativeBuildError(BitsmithError):
    """The C executor could not be compiled (no gcc, or a compiler error)."""


def source_text() -> bytes:
    return resources.files(__package__).joinpath("native", SOURCE).read_bytes()


def cpu_has_avx2() -> bool:
    """Whether this CPU can run the portable engine (every flag of ``SPEC``)."""
    return cpu_runs(PORTABLE_ISA)


def cpu_runs(isa: str) -> bool:
    """Whether this CPU has every flag the ``isa`` build needs."""
    spec = ENGINE_ISAS[isa].spec
    return native_loader.host_arch() == spec.arch and set(spec.features) <= native_loader.cpu_features()


def choose_isa(mcpu: str) -> str:
    """The engine build for a target ``mcpu``: "avx512" when that CPU has AVX-512 F/BW/VL, else
    "avx2". ``host``/``native`` read this CPU's flags; other names are asked of gcc (-march),
    then of LLVM through TVM where installed (gcc 12 does not know znver4)."""
    need = {"avx512f", "avx512bw", "avx512vl"}
    flags = native_loader.cpu_features() if mcpu in ("host", "native") else _mcpu_flags(mcpu)
    return "avx512" if need <= flags else PORTABLE_ISA


_GCC_MACROS = {"__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX2__": "avx2"}


@functools.lru_cache(maxsize=16)
def _mcpu_flags(mcpu: str) -> frozenset[str]:
    """The cpuinfo flags (of those ``choose_isa`` needs) a CPU name implies."""
    if not isinstance(mcpu, str) or not mcpu or mcpu.startswith("-") \
            or not all(c.isalnum() or c in "-_.+" for c in mcpu):
        raise NativeBuildError(f"lut-cpu: mcpu {mcpu!r} is not a CPU name")
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise NativeBuildError("target lut-cpu needs a C compiler (gcc) at compile time to build its executor")
    proc = subprocess.run([cc, f"-march={mcpu}", "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
    if proc.returncode == 0:
        macros = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("#define ")}
        return frozenset(flag for macro, flag in _GCC_MACROS.items() if macro in macros)
    try:
        import tvm
        from tvm.target import codegen
        if mcpu in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})):
            return frozenset(native_loader.llvm_spec("lut-engine", tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).features)
    except Exception:  # no TVM: only gcc's names are known
        pass
    raise NativeBuildError(f"lut-cpu: neither {cc} (-march) nor LLVM knows mcpu {mcpu!r}")


def build_library(source: bytes | None = None, isa: str = PORTABLE_ISA) -> bytes:
    """The shared library's bytes for build ``isa``, compiled from ``source`` (default: the
    packaged C file) once per process, and granted to ``native_loader`` (built here) on every call."""
    engine = ENGINE_ISAS[isa]
    data = _compile(source_text() if source is None else source, engine.cflags)
    native_loader.grant_built(data, engine.spec)
    return data


@functools.lru_cache(maxsize=8)
def _compile(source: bytes, cflags: tuple[str, ...] = CFLAGS) -> bytes:
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        raise NativeBuildError("target lut-cpu needs a C compiler (gcc) at compile time to build its executor")
    with tempfile.TemporaryDirectory(prefix="bitsmith-lut-") as d:
        src, out = os.path.join(d, SOURCE), os.path.join(d, "lutexec.so")
        with open(src, "wb") as f:
            f.write(source)
        # relative names from inside the temporary directory, and its name mapped away, so the
        # random directory name reaches no byte of the library (artifacts are deterministic)
        proc = subprocess.run([cc, *cflags, f"-ffile-prefix-map={d}=.", SOURCE, "-o", "lutexec.so", "-lm"],
                              capture_output=True, text=True, cwd=d)
        if proc.returncode:
            raise NativeBuildError(f"building the LUT executor failed ({cc} {' '.join(cflags)}):\n{proc.stderr[-2000:]}")
        with open(out, "rb") as f:
            return f.read()


class NativeExecutor:
    """ctypes binding of ``lut_plan`` (validate once per program) and ``lut_exec`` (run)."""

    def __init__(self, library: bytes, isa: str = PORTABLE_ISA) -> None:
        self.sha256 = hashlib.sha256(library).hexdigest()
        self.isa = ENGINE_ISAS[isa]
        self._lib = native_loader.load(library, LIBRARY_FILE, ctypes.CDLL)
        abi = int(self._lib.lut_abi_version())
        if abi != ABI_VERSION:
            raise NativeBuildError(f"lutexec.so speaks ABI {abi}, this runtime speaks {ABI_VERSION}; "
                                   "recompile the artifact with this bitsmith")
        code = int(self._lib.lut_isa()) if hasattr(self._lib, "lut_isa") else ENGINE_ISAS[PORTABLE_ISA].code
        if code != self.isa.code:
            raise NativeBuildError(f"lutexec.so was built for instruction set {code} (lut_isa()), the artifact "
                                   f"records {isa!r} ({self.isa.code}); recompile the artifact")
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._plan = self._lib.lut_plan
        self._plan.argtypes = [p, i64, i64, i64, p, i64, p, p]
        self._plan.restype = i64
        # libraries in artifacts from before W4A8 have only lut_exec (int8 or fp32 tables)
        self.has_a8 = hasattr(self._lib, "lut_exec_tables")
        self._run_stream = self._lib.lut_exec_tables if self.has_a8 else self._lib.lut_exec
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
            out: np.ndarray | None = None, launcher: int | None = None, activation_bits: int = 32) -> np.ndarray:
        """y [M, N] for x [M, K]; written into ``out`` (float32, C-contiguous [M, N]) when given.
        ``launcher``: address of a TVMBackendParallelLaunch-compatible function to run the
        parallel parts on (None: the engine's own thread pool). ``activation_bits=8``: activations quantized to int8
        per table block, exact integer tables (W4A8; needs ``int8_tables``)."""
        if activation_bits not in (8, 32):
            raise ValueError(f"activation_bits must be 8 or 32, got {activation_bits!r}")
        if activation_bits == 8 and not int8_tables:
            raise ValueError("activation_bits=8 runs on integer tables; fp32 tables take float activations")
        if activation_bits == 8 and not self.has_a8:
            raise NativeBuildError("this lutexec.so predates activation_bits=8; recompile the artifact")
        kind = TABLES_A8 if activation_bits == 8 else TABLES_INT8 if int8_tables else TABLES_FP32
        return self.plan(program)(x, kind, threads, out, launcher)


class _BoundStream:
    """A validated program with its operand pointers resolved: a call costs one ctypes call plus
    the checks on x and out (this runs ~200 times per decoded token of SmolLM2)."""

    def __init__(self, fn: Any, program: LayerProgram, pos: np.ndarray, ntables: int, nsegs: int) -> None:
        head = program.header
        self.program, self.pos = program, pos  # keep the arrays alive with their pointers
        self.ntables, self.nsegs = ntables, nsegs  # pos: tables, tiles, then same-shape group lengths
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

    def __call__(self, x: np.ndarray, kind: int, threads: int, out: np.ndarray | None,
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
        err = self._call(xp.ctypes.data, m, y.ctypes.data, kind, int(threads), launcher)
        if err:
            raise StreamError(f"LUT executor failed: {ERRORS.get(err & 0xFF, 'error')}")
        return y


def tvm_parallel_launcher() -> int | None:
    """Address of TVMBackendParallelLaunch in this process (TVM's runtime loads it globally), or None."""
    try:
        return ctypes.cast(ctypes.CDLL(None).TVMBackendParallelLaunch, ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None


def load_library(library: bytes, isa: str = PORTABLE_ISA) -> NativeExecutor | None:
    """The executor for these library bytes (the ``isa`` build), or None on a CPU without
    AVX2/FMA (callers fall back to the reference executor). A build for more than AVX2 on a CPU
    that lacks it is refused: the artifact was compiled for another machine."""
    if isa not in ENGINE_ISAS:
        raise NativeBuildError(f"unknown LUT engine build {isa!r}; this runtime knows {sorted(ENGINE_ISAS)}")
    if not cpu_has_avx2():
        return None
    engine = ENGINE_ISAS[isa]
    missing = engine.spec.missing()
    if missing:
        raise native_loader.UnsupportedCPUError(
            f"the lut-cpu engine ({LIBRARY_FILE}) was compiled for {engine.name} ({engine.spec.describe()}); this "
            f"CPU lacks {' '.join(missing)}. Recompile the model for this machine (mcpu='host') or portably "
            f"(mcpu='x86-64-v3', the AVX2 build)")
    return NativeExecutor(library, isa)
