"""Typed errors a user can act on; every layer raises these (they import nothing)."""

from __future__ import annotations

from typing import Any


class BitsmithError(Exception):
    """Base class: the CLI prints these as one line and exits 2."""


class UnsupportedOpError(BitsmithError):
    """An op (from a captured model, or in the IR) that a frontend or target cannot handle."""

    def __init__(self, op: str, *, module_path: str = "", source: str = "", target: str = "",
                 detail: str = "", function: str = "") -> None:
        self.op, self.module_path, self.source, self.target = op, module_path, source, target
        self.function, self.detail = function, detail
        where = ", ".join(p for p in (f"module {module_path}" if module_path else "",
                                      f"source {source}" if source else "",
                                      f"function {function}" if function else "",
                                      f"target {target}" if target else "") if p)
        msg = f"unsupported op {op}" + (f" ({where})" if where else "")
        super().__init__(msg + (f": {detail}" if detail else ""))

    @classmethod
    def at(cls, node: Any, *, target: str, function: str = "", detail: str = "") -> "UnsupportedOpError":
        """The error for IR node ``node`` (anything with ``op`` and ``loc``), located by its
        Location (module path, source line) when it has one."""
        loc = getattr(node, "loc", None)
        return cls(node.op, module_path=getattr(loc, "module_path", "") or "",
                   source=getattr(loc, "source", "") or "", target=target, function=function, detail=detail)


class UnknownTargetError(BitsmithError):
    def __init__(self, target: str, known: list[str] | tuple[str, ...]) -> None:
        self.target, self.known = target, tuple(known)
        super().__init__(f"unknown target {target!r}; known targets: {', '.join(sorted(known)) or '(none)'}")


class UnknownOptionError(BitsmithError):
    def __init__(self, what: str, name: str, valid: list[str] | tuple[str, ...]) -> None:
        self.name, self.valid = name, tuple(valid)
        super().__init__(f"unknown {what} {name!r}; valid: {', '.join(sorted(valid)) or '(none)'}")


class ArtifactError(BitsmithError):
    """An artifact directory that is missing, corrupted, truncated or inconsistent."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"bad artifact file {path}: {problem}")


class OptionError(BitsmithError, ValueError):
    """A target option of the wrong type or value (at load: an artifact's stored option)."""


class PluginError(BitsmithError):
    """A backend plugin that could not be loaded."""


class ModelLoadError(BitsmithError):
    """A model name or path that cannot be loaded."""


class PassError(BitsmithError):
    """A pass failed or left an ill-formed module; names the pass and those before it."""
