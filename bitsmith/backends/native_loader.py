"""The one way bitsmith loads native code: TVM kernel libraries, CUDA host modules, the LUT engine.

A shared library runs its constructors the moment it is dlopened, so every load goes through
``load`` here, which enforces three rules:

1. **Granted bytes only.** The sha256 of the in-memory bytes must have been granted in this
   process: by a build that produced those bytes here (``BUILT``), or by the artifact loader
   after its trust decision (``runtime/trust.py``: digests in the local trust store, or the
   caller's ``trust_native_code=True``). A library a manifest forgot to declare is refused.
2. **A CPU that has the instruction set.** Each grant carries a ``NativeSpec`` (the CPU the
   code was built for and the ``/proc/cpuinfo`` flags that implies); a CPU lacking any of them
   is refused with ``UnsupportedCPUError`` naming the missing flags, instead of dying of SIGILL.
3. **Exactly the bytes hashed.** The bytes are written to a new file (``O_EXCL|O_NOFOLLOW``,
   mode 0500) in a private 0700 directory of this process, opened from there, and unlinked at
   once; no path another user could change is ever read back. (A sealed memfd would be
   stronger, but glibc's dlopen matches ``/proc/self/fd/N`` by name and would hand back a
   stale library when a descriptor number is reused; unique file names avoid that.)
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import itertools
import os
import platform
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..errors import BitsmithError

T = TypeVar("T")

BUILT = "built"              # produced by a compiler in this process (or a verified cache entry)
TRUSTED_STORE = "store"      # digest listed in the local trust store
TRUSTED_CALLER = "caller"    # the caller passed trust_native_code=True

_FLAG = re.compile(r"[a-z0-9_.]+")

# LLVM x86 feature name -> /proc/cpuinfo flag, for the features compute code can emit. Features
# outside this table (system instructions such as shstk or movdir64b) are not recorded.
LLVM_TO_CPUINFO = {
    "sse": "sse", "sse2": "sse2", "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1",
    "sse4.2": "sse4_2", "sse4a": "sse4a", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "fma4": "fma4", "xop": "xop", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "adx": "adx", "aes": "aes", "pclmul": "pclmulqdq",
    "sha": "sha_ni", "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq",
    "avxvnni": "avx_vnni", "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avx512vp2intersect": "avx512_vp2intersect",
}


KNOWN_FLAGS = frozenset(LLVM_TO_CPUINFO.values())  # every flag a NativeSpec of a build here can hold
KNOWN_ARCHS = ("x86_64", "aarch64", "riscv64", "ppc64le", "s390x", "loongarch64", "armv7l", "i686")


class NativeCodeError(BitsmithError):
    """Native code that bitsmith refuses to load (not granted, or not for this CPU)."""


class UndeclaredNativeCodeError(NativeCodeError):
    """Bytes nobody granted: not built here and not declared (and trusted) by an artifact's manifest."""


class UnsupportedCPUError(NativeCodeError):
    """Native code built for an instruction set this CPU lacks."""


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """This CPU's feature flags as ``/proc/cpuinfo`` names them (``flags`` on x86,
    ``Features`` on ARM); empty where the file is unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@dataclass(frozen=True)
class NativeSpec:
    """What a native library is and the instruction set it needs.

    ``kind`` names the producer ("tvm-llvm-kernel", "lut-engine", "tvm-cuda-host"); ``cpu`` the
    CPU model it was compiled for (an LLVM/gcc name such as "znver4" or "x86-64-v3");
    ``features`` the ``/proc/cpuinfo`` flags that model implies (sorted)."""

    kind: str
    arch: str
    cpu: str
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(sorted(set(self.features))))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "arch": self.arch, "cpu": self.cpu, "features": list(self.features)}

    @classmethod
    def from_json(cls, obj: Any) -> "NativeSpec":
        """Raises ValueError (with the field) on anything but the exact shape ``to_json`` writes."""
        if not isinstance(obj, dict) or set(obj) != {"kind", "arch", "cpu", "features"}:
            raise ValueError("expected an object with exactly kind, arch, cpu, features")
        for key in ("kind", "arch", "cpu"):
            if not isinstance(obj[key], str) or not obj[key]:
                raise ValueError(f"{key}: expected a non-empty string")
        feats = obj["features"]
        if not isinstance(feats, list) or not all(isinstance(f, str) and _FLAG.fullmatch(f) for f in feats):
            raise ValueError("features: expected a list of cpuinfo flag names ([a-z0-9_.]+)")
        if feats != sorted(set(feats)):
            raise ValueError("features: expected sorted, without repeats")
        unknown = [f for f in feats if f not in KNOWN_FLAGS]
        if unknown:  # not a flag any build here records: a damaged record, not code for another CPU
            raise ValueError(f"features: {' '.join(unknown[:4])} {'is' if len(unknown) == 1 else 'are'} not among "
                             "the cpuinfo flags bitsmith records"[:200])
        if obj["arch"] not in KNOWN_ARCHS and obj["arch"] != host_arch():
            raise ValueError(f"arch: {obj['arch'][:40]!r} is not one of {list(KNOWN_ARCHS)}")
        return cls(obj["kind"], obj["arch"], obj["cpu"], tuple(feats))

    def describe(self) -> str:
        return f"{self.arch} {self.cpu}" + (f" ({' '.join(self.features)})" if self.features else "")

    def missing(self) -> list[str]:
        """What this CPU lacks to run the code: ["arch <x>"] or the absent flags, [] if nothing."""
        if self.arch != host_arch():
            return [f"arch {self.arch}"]
        have = cpu_features()
        if not have:  # nothing to compare against (no /proc/cpuinfo): let the OS decide
            return []
        return [f for f in self.features if f not in have]


def llvm_spec(kind: str, target: Any) -> NativeSpec:
    """The spec of code LLVM builds for a TVM llvm ``target`` (its concrete ``mcpu``)."""
    from tvm.target import codegen
    cpu = str(target.attrs.get("mcpu", "")) or "generic"
    llvm = set(codegen.llvm_get_cpu_features(target)) if host_arch() == "x86_64" else set()
    return NativeSpec(kind, host_arch(), cpu, tuple(LLVM_TO_CPUINFO[f] for f in llvm if f in LLVM_TO_CPUINFO))


def check_cpu(spec: NativeSpec, name: str) -> None:
    missing = spec.missing()
    if missing:
        raise UnsupportedCPUError(f"native library {name} was built for {spec.describe()}; this CPU lacks "
                                  f"{' '.join(missing)} (recompile the model on this machine, or with an "
                                  "mcpu this CPU has, e.g. mcpu='x86-64-v3' for AVX2)")


# --- grants --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grant:
    spec: NativeSpec
    origin: str


_grants: dict[str, Grant] = {}
_lock = threading.Lock()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def grant(digest: str, spec: NativeSpec, origin: str) -> None:
    """Allows the bytes with this sha256 to load in this process, with this spec.

    A ``BUILT`` grant is never downgraded (``save`` adds built digests to the trust store)."""
    with _lock:
        old = _grants.get(digest)
        if old is not None and old.origin == BUILT and origin != BUILT:
            origin = BUILT
        _grants[digest] = Grant(spec, origin)


def grant_built(data: bytes, spec: NativeSpec) -> str:
    digest = sha256(data)
    grant(digest, spec, BUILT)
    return digest


def granted(digest: str) -> Grant | None:
    with _lock:
        return _grants.get(digest)


def built_here(digests: Iterable[str]) -> list[str]:
    with _lock:
        return [d for d in digests if (g := _grants.get(d)) is not None and g.origin == BUILT]


def reset_grants() -> None:
    """Forgets every grant, as a fresh process starts (for tests that load many artifacts in one
    process and must judge each as a new process would; libraries already loaded stay loaded)."""
    with _lock:
        _grants.clear()


# --- loading -------------------------------------------------------------------------------

_dir: str | None = None
_counter = itertools.count()


def _private_dir() -> str:
    global _dir
    with _lock:
        if _dir is None or not os.path.isdir(_dir):
            _dir = tempfile.mkdtemp(prefix="bitsmith-native-")  # mode 0700, owned by this user
            atexit.register(shutil.rmtree, _dir, True)
        return _dir


def load(data: bytes, name: str, opener: Callable[[str], T]) -> T:
    """``opener(path)`` on a private copy of exactly ``data``, after the checks above.

    ``name`` (e.g. "target/kernels/<key>.so") appears in errors only. The file is unlinked
    as soon as ``opener`` returns: the loaded mapping stays valid, nothing is left on disk."""
    data = bytes(data)
    digest = sha256(data)
    g = granted(digest)
    if g is None:
        raise UndeclaredNativeCodeError(f"native library {name} (sha256 {digest}) was neither built in this process nor "
                              "declared and trusted by the artifact it came from; refusing to load it")
    check_cpu(g.spec, name)
    path = os.path.join(_private_dir(), f"{next(_counter)}-{os.getpid()}-{digest[:16]}.so")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o500)
        return opener(path)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
