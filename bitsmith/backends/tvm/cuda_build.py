"""Compile one KernelDef for CUDA: schedule, TVM codegen, nvcc; cached on disk.

A compiled kernel is five files under the tvm kernel cache (``cache.cache_dir()``), named by
``cache.kernel_key`` of the (scratch-rewritten) definition, the CUDA schedule id and the
target:
  ``<key>.so``      the host launch code + the device module (exported by TVM),
  ``<key>.cu``      the CUDA C source TVM generated,
  ``<key>.fatbin``  sm_XX SASS + compute_XX PTX built by nvcc from that source,
  ``<key>.ptx``     the PTX nvcc produced (kept for inspection and for the artifact),
  ``<key>.json``    functions in the library, scratch specs, sha256 of the source and library.
An entry is used only when its library is a regular file of this user whose sha256 matches the
json (read once; those bytes are loaded and saved), else it is rebuilt.
nvcc is required unless the caller opts out (``CudaCompiler(use_nvcc=False)``, target option
``nvcc="skip"``): then the fatbin/ptx are absent and the device code is compiled from the source
when the library is loaded on a GPU, by TVM's compiler with TVM's flags (``cuda_runtime``).
A missing nvcc is an error, never a silent switch to that path.

Why the fatbin is not inside the .so: TVM 0.27 built without the CUDA runtime (the PyPI
wheel) keeps only the source in the exported device module (``CUDAFallbackModuleNode``,
format "cuda"); a CUDA-enabled runtime compiles it at load through the
``tvm_callback_cuda_compile`` hook. ``cuda_runtime`` installs a hook that returns the
nvcc-built fatbin stored here for that exact source, so no compiler runs at load time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tvm

from ...errors import BitsmithError
from .. import native_loader
from .cache import cache_dir, kernel_key, read_own_file
from .cuda_runtime import SCHEDULE_ID, host_spec, source_digest
from .cuda_scratch import ScratchSpec, promote_to_params
from .kernel import KernelDef

SCRATCH_BY_KIND = {"attention": ("scores",)}  # intermediates that must be parameters on CUDA


NVCC_FLAGS = ("--fatbin", "-O3", "--use_fast_math")  # + -gencode for the target arch (nvcc_flags)
NVCC_MISSING = ("tvm-cuda: nvcc not found on PATH. It builds every kernel's PTX and fatbin at compile time; "
                "install the CUDA toolkit or put nvcc on PATH, or pass the target option nvcc='skip' to ship "
                "CUDA source only (the GPU machine then compiles it at load with TVM's compiler and flags)")


class NvccMissingError(BitsmithError):
    """nvcc is required (the default) and not on PATH."""


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def nvcc_flags(target: Any) -> list[str]:
    """The nvcc flags every kernel is built with (recorded in the artifact's plan.json)."""
    num = _arch_number(target)
    return [*NVCC_FLAGS, f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]"]


def _arch_number(target: Any) -> str:
    arch = str(target.attrs.get("arch", "sm_90"))
    return arch[3:]


def nvcc_compile(source: str, target: Any) -> tuple[bytes, str, float]:
    """(fatbin with SASS for the target arch and its PTX, the PTX text, seconds) by nvcc."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise NvccMissingError(NVCC_MISSING)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bitsmith-nvcc-") as d:
        cu = Path(d) / "kernel.cu"
        cu.write_text(source)
        cmd = [nvcc, *nvcc_flags(target), "--keep", "--keep-dir", d,
               "-o", str(Path(d) / "kernel.fatbin"), str(cu)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BitsmithError(f"nvcc failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        ptx_files = sorted(Path(d).glob("*.ptx"))
        if not ptx_files:
            raise BitsmithError("nvcc --keep produced no PTX file")
        return (Path(d) / "kernel.fatbin").read_bytes(), ptx_files[0].read_text(), time.perf_counter() - t0


@dataclass(frozen=True)
class CudaKernel:
    """One compiled kernel: its files' bytes and what the runtime needs to call it."""

    key: str
    name: str
    kind: str
    functions: tuple[str, ...]          # "main", and "main_gemv"/"main_small" for dynamic-row linears
    scratch: tuple[ScratchSpec, ...]
    library: bytes
    source: str
    fatbin: bytes | None
    ptx: str | None
    schedules: tuple[str, ...] = ()     # how each function was scheduled ("" where unrecorded)

    def meta(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "kind": self.kind, "functions": list(self.functions),
                "schedules": list(self.schedules),
                "scratch": [s.to_json() for s in self.scratch],
                "source_sha256": source_digest(self.source),
                "library_sha256": native_loader.sha256(self.library)}


@dataclass
class CudaCompiler:
    """Compiles through the disk cache; counts hits/misses and compile/nvcc seconds.

    ``use_nvcc``: True (required: a missing nvcc raises NvccMissingError) or False (skip: no
    fatbin/ptx, the runtime compiles the source)."""

    target: Any
    use_nvcc: bool = True
    directory: Path = field(default_factory=cache_dir)
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0
    nvcc_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)

    def prepare(self, kdef: KernelDef) -> tuple[KernelDef, list[ScratchSpec]]:
        if kdef.scratch:  # a hand-scheduled kernel declares its scratch parameters itself
            return kdef, list(kdef.scratch)
        names = SCRATCH_BY_KIND.get(kdef.kind, ())
        if not names:
            return kdef, []
        n_out = 1
        func, specs = promote_to_params(kdef.func, names, n_out)
        return KernelDef(kdef.name, func, kdef.kind), specs

    def compile(self, kdef: KernelDef) -> CudaKernel:
        kdef, specs = self.prepare(kdef)
        want_nvcc = self.use_nvcc
        if want_nvcc and nvcc_path() is None:
            raise NvccMissingError(NVCC_MISSING)
        from .schedule_mma import generator_digest
        key = kernel_key(kdef, f"{SCHEDULE_ID}+{generator_digest()}" + ("+nvcc" if want_nvcc else ""), self.target)
        cached = self._read(key, kdef, want_nvcc)
        if cached is not None:
            self.hits += 1
            native_loader.grant_built(cached.library, host_spec(self.target))
            return cached
        self.misses += 1
        from .schedule_cuda import schedule_kernel
        from .schedule_mma import schedule_of
        t0 = time.perf_counter()
        mod = schedule_kernel(kdef, self.target)
        functions = tuple(sorted(gv.name_hint for gv in mod.get_global_vars()))
        with self.target:
            lib = tvm.compile(mod, target=self.target)
        source = lib.mod.imports[0].inspect_source()
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory) as tmp:
            so = Path(tmp) / "lib.so"
            lib.export_library(str(so))
            library = so.read_bytes()
        self.compile_seconds += time.perf_counter() - t0
        fatbin = ptx = None
        if want_nvcc:
            fatbin, ptx, secs = nvcc_compile(source, self.target)
            self.nvcc_seconds += secs
        kernel = CudaKernel(key, kdef.name, kdef.kind, functions, tuple(specs), library, source, fatbin, ptx,
                            tuple(schedule_of(mod[f]) for f in functions))
        self._write(kernel)
        native_loader.grant_built(library, host_spec(self.target))
        return kernel

    # ------------------------------------------------------------ disk cache

    def _files(self, key: str) -> dict[str, Path]:
        return {ext: self.directory / f"{key}.{ext}" for ext in ("so", "cu", "json", "fatbin", "ptx")}

    def _write(self, k: CudaKernel) -> None:
        blobs: dict[str, bytes] = {"so": k.library, "cu": k.source.encode(), "json": json.dumps(k.meta()).encode()}
        if k.fatbin is not None and k.ptx is not None:
            blobs["fatbin"], blobs["ptx"] = k.fatbin, k.ptx.encode()
        paths = self._files(k.key)
        for ext in ("so", "cu", "fatbin", "ptx", "json"):  # json last: its presence marks a complete entry
            if ext in blobs:
                tmp = paths[ext].with_suffix(f".{ext}.tmp{os.getpid()}")
                tmp.write_bytes(blobs[ext])
                os.replace(tmp, paths[ext])

    def _read(self, key: str, kdef: KernelDef, want_nvcc: bool) -> CudaKernel | None:
        paths = self._files(key)
        try:
            meta = json.loads(paths["json"].read_text())
            library = read_own_file(paths["so"]) or b""
            source = paths["cu"].read_text()
            fatbin = paths["fatbin"].read_bytes() if want_nvcc else None
            ptx = paths["ptx"].read_text() if want_nvcc else None
        except (OSError, ValueError):
            return None
        if meta.get("source_sha256") != source_digest(source) or not library \
                or meta.get("library_sha256") != native_loader.sha256(library):
            return None  # tampered, half-written or written by an older bitsmith: rebuild
        scratch = tuple(ScratchSpec.from_json(s) for s in meta.get("scratch", []))
        return CudaKernel(key, kdef.name, kdef.kind, tuple(meta["functions"]), scratch, library, source, fatbin, ptx,
                          tuple(str(s) for s in meta.get("schedules", ())))
