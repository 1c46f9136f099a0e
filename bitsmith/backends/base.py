"""The Backend interface and the registry that finds backends through entry points.

Built-in backends register exactly as a third-party plugin does: an entry in the
``bitsmith.backends`` entry-point group whose key is the backend name and whose object is a
``Backend`` subclass declaring the targets it serves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from ..errors import PluginError, UnknownTargetError, UnsupportedOpError
from ..ir import Module, Node
from ..ir.ops import OPS
from ..ir.traits import CALL, ops_with
from ..tolerance import Tolerance

if TYPE_CHECKING:
    from .native_loader import NativeSpec

ENTRY_POINT_GROUP = "bitsmith.backends"


class Executable(ABC):
    """A module built for one target: runs IR functions on numpy arrays."""

    @abstractmethod
    def run(self, function: str, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Runs ``function``. Must be safe to call from several threads at once, with results
        bit-identical to serial calls (a server's workers share one loaded model); every
        built-in CPU executable is (tests/test_thread_safety.py)."""

    def kv_session(self) -> Any:
        """A session that keeps a language model's KV caches at a fixed capacity and updates them
        in place (``start(batch, capacity)``, ``step(ids, positions, mask) -> logits``, and
        optionally ``step(..., last_only=True)`` -> the last position's logits [batch, 1, vocab],
        which generation asks for on the prompt step where ``step`` takes it; see
        tvm/kv_inplace.py and runtime/generate.py ``CacheSession``), or None: generation then
        runs ``main`` on concatenated caches."""
        return None

    def files(self) -> dict[str, bytes]:
        """Target files (kernel libraries, programs) that an artifact must store."""
        return {}

    def native_files(self) -> dict[str, "NativeSpec"]:
        """The entries of ``files()`` that are native code (shared libraries), with the kind and
        instruction set each was built for. An artifact records them (manifest ``native``) so
        that trust and CPU checks happen from the manifest alone, before any byte is loaded;
        a backend must load them only through ``native_loader.load``."""
        return {}

    def report(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Pipeline:
    """A backend's passes in three phases, each a tuple of pass specs (names in the pass
    registry, with options: ``"half-precision{dtype=float16}"``), run after the target-neutral
    passes and in this order:

    * ``legalize``: rewrite what the target cannot take into what it can (inline calls, ...);
    * ``lower``: target-specific IR -> IR rewrites (fp16 activations for a GPU, ...);
    * ``finalize``: cleanup before ``build`` (dce, ...).

    The API runs them through the same PassManager as every other pass (verified after each,
    seen by ``print_after``/``dump_ir``, listed in ``compile_info["pipeline"]``), then checks
    the result once against ``Backend.legal_ops``."""

    legalize: tuple[str, ...] = ()
    lower: tuple[str, ...] = ()
    finalize: tuple[str, ...] = ()

    def specs(self) -> tuple[str, ...]:
        """Every phase's pass specs, in run order."""
        return self.legalize + self.lower + self.finalize


@dataclass(frozen=True)
class LegalOps:
    """The ops a target's ``build`` accepts after its pipeline; ``check(node)`` returns a reason
    when the node's attributes are not supported (None: supported)."""

    ops: frozenset[str]
    check: Callable[[Node], str | None] | None = None


def interpretable_ops() -> frozenset[str]:
    """Ops the reference interpreter runs: those with an interpreter rule, and calls."""
    from ..ir.interpreter import RULES
    return frozenset(RULES) | ops_with(CALL)


def check_legal(module: Module, legal: LegalOps, target: str) -> None:
    """Raises UnsupportedOpError (op, module path, source line, function, target) for the first
    node of ``module`` that ``legal`` refuses."""
    for fn in module.functions:
        for node in fn.nodes:
            if node.op not in legal.ops:
                raise UnsupportedOpError.at(node, target=target, function=fn.name,
                                            detail="not among the ops this target accepts after its pipeline")
            reason = legal.check(node) if legal.check is not None else None
            if reason:
                raise UnsupportedOpError.at(node, target=target, function=fn.name, detail=reason)


class Backend(ABC):
    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]

    def option_defaults(self, target: str) -> dict[str, Any]:
        """Target-specific compile options this backend accepts, with their defaults."""
        return {}

    def pipeline(self, target: str, options: Mapping[str, Any]) -> Pipeline:
        """The passes (by phase) that turn a target-neutral module into what ``build`` takes;
        ``options`` are the resolved compile options."""
        return Pipeline()

    def legal_ops(self, target: str, options: Mapping[str, Any]) -> LegalOps:
        """What ``build`` accepts after the pipeline (default: every registered op but ``call``,
        which a backend accepts only when it runs calls itself)."""
        return LegalOps(frozenset(OPS) - ops_with(CALL))

    def tolerance(self, target: str, options: Mapping[str, Any]) -> Tolerance:
        """How far this target's results may stray from the reference interpreter's (float32
        results computed in another order, or in lower precision). The backend-conformance
        suite (``bitsmith.testing``) holds the target to it; declare what you measured. The
        default fits a float32 backend that sums in another order (the example plugin's float32
        kernels: 1.8e-5 of max|logit| on SmolLM2, docs/writing-a-backend.md)."""
        return Tolerance(rtol=1e-4, atol=1e-5, scale_rtol=1e-4)

    @abstractmethod
    def build(self, module: Module, target: str, options: Mapping[str, Any]) -> Executable:
        ...

    @abstractmethod
    def load(self, module: Module, target: str, options: Mapping[str, Any],
             files: Mapping[str, bytes]) -> Executable:
        """Rebuilds an Executable from a saved artifact's target files.

        ``files`` is a ``backends.files.TargetFiles``: a Mapping[str, bytes] that reads a file
        only when asked and checks its size and sha256 over the bytes it returns; large files
        should be read with ``files.read_array`` (once, aligned, no second copy). See
        docs/artifact-format.md, "Backend plugins"."""


_BACKENDS: dict[str, Backend] | None = None


def _load_entry_point(ep: metadata.EntryPoint) -> Backend:
    try:
        obj = ep.load()
    except Exception as e:  # any import failure of a plugin is the plugin's problem, named
        raise PluginError(f"backend plugin {ep.name!r} ({ep.value}) failed to load: "
                          f"{type(e).__name__}: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise PluginError(f"backend plugin {ep.name!r} ({ep.value}) is not a bitsmith Backend subclass")
    if getattr(obj, "name", None) != ep.name:
        raise PluginError(f"backend plugin {ep.name!r} ({ep.value}) declares name {getattr(obj, 'name', None)!r}; "
                          f"the entry-point key must equal it")
    targets = getattr(obj, "targets", None)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise PluginError(f"backend plugin {ep.name!r} ({ep.value}) declares no targets")
    return obj()


def backends(refresh: bool = False) -> dict[str, Backend]:
    """All registered backends by name (entry points are read once per process)."""
    global _BACKENDS
    if _BACKENDS is None or refresh:
        found: dict[str, Backend] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in found:
                continue  # the same distribution seen twice on sys.path
            found[ep.name] = _load_entry_point(ep)
        _BACKENDS = found
    return _BACKENDS


def targets() -> dict[str, Backend]:
    """Every target name mapped to the backend that serves it."""
    out: dict[str, Backend] = {}
    for backend in backends().values():
        for t in backend.targets:
            if t in out:
                raise PluginError(f"target {t!r} is served by both backend {out[t].name!r} and {backend.name!r}")
            out[t] = backend
    return out


def backend_for_target(target: str) -> Backend:
    known = targets()
    if target not in known:
        raise UnknownTargetError(target, list(known))
    return known[target]
