"""Standalone compiled CUDA kernels on disk, for benchmarks and GPU checks.

A bundle is ``<name>.so`` + ``<name>.json`` (functions, scratch specs, source sha256) and,
where nvcc ran, ``<name>.fatbin`` + ``<name>.ptx``. It is built where TVM's compiler is
(``save_kernel``) and loaded where only TVM's runtime and a GPU are (``load_kernel``): the
fatbin is handed to TVM through the compile hook of ``cuda_runtime``, so loading compiles
nothing. Like an artifact, a bundle's library loads only if its sha256 is in the local trust
store (``save_kernel`` adds it) or the caller passes ``trust_native_code=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ...errors import BitsmithError
from .. import native_loader
from .cuda_runtime import BINARIES, DeviceKernel, KernelLibraries, host_spec, source_digest
from .cuda_scratch import ScratchSpec
from .kernel import KernelDef

_LIBS: list[KernelLibraries] = []  # keeps loaded bundles' temp dirs alive for the process


def save_kernel(kdef: KernelDef, directory: str | Path, name: str, arch: str = "sm_90") -> dict[str, Any]:
    """Compiles ``kdef`` for CUDA into ``directory/name.*``; returns its metadata."""
    from .cuda_build import CudaCompiler
    from .schedule_cuda import cuda_target
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    from ...runtime import trust
    target = cuda_target(arch)
    k = CudaCompiler(target).compile(kdef)
    meta = {**k.meta(), "bundle": name, "arch": arch, "nvcc": k.fatbin is not None,
            "host_isa": host_spec(target).to_json()}
    (d / f"{name}.so").write_bytes(k.library)
    if k.fatbin is not None and k.ptx is not None:
        (d / f"{name}.fatbin").write_bytes(k.fatbin)
        (d / f"{name}.ptx").write_text(k.ptx)
    (d / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    trust.add({meta["library_sha256"]: f"written by this machine's bitsmith: kernel bundle {d / name}.so"})
    return meta


def load_kernel(directory: str | Path, name: str, max_rows: int = 8,
                trust_native_code: bool = False) -> tuple[Callable[..., None], DeviceKernel]:
    """(callable taking device tensors: inputs, scratch, outputs; the DeviceKernel)."""
    from ...runtime import trust
    d = Path(directory)
    try:
        meta = json.loads((d / f"{name}.json").read_text())
        library = (d / f"{name}.so").read_bytes()
        spec = native_loader.NativeSpec.from_json(meta["host_isa"])
    except (OSError, ValueError, KeyError) as e:
        raise BitsmithError(f"kernel bundle {d / name}: {e}") from None
    digest = native_loader.sha256(library)
    if meta.get("library_sha256") != digest:
        raise BitsmithError(f"kernel bundle {d / name}.so: sha256 {digest} does not match its json")
    if not trust_native_code and digest not in trust.trusted():
        raise native_loader.NativeCodeError(
            f"kernel bundle {d / name}.so (sha256 {digest[:16]}…) was not built on this machine and is not in the "
            f"trust store {trust.store_path()}; pass trust_native_code=True if you trust its source")
    native_loader.grant(digest, spec, native_loader.TRUSTED_CALLER if trust_native_code else native_loader.TRUSTED_STORE)
    fatbin = d / f"{name}.fatbin"
    if fatbin.is_file():
        BINARIES.add(str(meta["source_sha256"]), fatbin.read_bytes())
    BINARIES.install()
    if not _LIBS:
        _LIBS.append(KernelLibraries())
    scratch = tuple(ScratchSpec.from_json(s) for s in meta["scratch"])
    fn = _LIBS[0].load(str(meta["key"]), library, meta["functions"], max_rows, scratch)
    return fn, DeviceKernel(fn, scratch)


__all__ = ["save_kernel", "load_kernel", "source_digest"]
