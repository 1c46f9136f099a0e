"""Passes as frozen dataclasses, a registry of them by name, and the textual pass spec.

A pass is a ``Module -> Module`` function with options: subclass :class:`Pass` as a frozen
dataclass, give it a class-level ``name`` and an ``apply``; its dataclass fields are its
options. ``@register_pass`` makes it reachable by name, e.g. from ``--pass "cse,fold{max_elements=64}"``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

from bitsmith.errors import PassError, UnknownOptionError
from bitsmith.ir import Function, Module


@dataclass(frozen=True)
class Pass:
    """Base of every pass. ``apply`` returns a new module and never mutates its input."""

    name: ClassVar[str] = ""
    # apply(apply(m)) == apply(m) for every module m; a conformance check tests passes that say so
    idempotent: ClassVar[bool] = False

    def apply(self, module: Module) -> Module:
        raise NotImplementedError(f"pass {type(self).__name__} does not implement apply()")


P = TypeVar("P", bound=type[Pass])
PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: P) -> P:
    """Class decorator: adds a frozen-dataclass Pass subclass to PASSES under its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise TypeError(f"{cls!r} is not a Pass subclass")
    params = cls.__dict__.get("__dataclass_params__")  # its own, not one inherited from Pass
    if params is None or not params.frozen:
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass")
    if not cls.name:
        raise TypeError(f"pass {cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice "
                         f"({PASSES[cls.name].__name__} and {cls.__name__})")
    PASSES[cls.name] = cls
    return cls


def pass_options(cls: type[Pass]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _option_fits(value: Any, want: Any) -> bool:
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want in (bool, str):
        return isinstance(value, want)
    return True  # richer option types are the pass's own to check


def get_pass(name: str, **options: Any) -> Pass:
    """Builds the registered pass ``name`` with the given options."""
    if name not in PASSES:
        raise UnknownOptionError("pass", name, sorted(PASSES))
    cls = PASSES[name]
    valid = pass_options(cls)
    for opt in options:
        if opt not in valid:
            raise UnknownOptionError(f"option of pass {name}", opt, valid)
    hints = typing.get_type_hints(cls)
    for opt, value in options.items():
        if not _option_fits(value, hints.get(opt)):
            raise PassError(f"option {opt} of pass {name} must be {hints[opt].__name__}, got {value!r}")
    return cls(**options)


def map_functions(module: Module, transform: Callable[[Function], Function]) -> Module:
    """Applies a per-function rewrite to every function of a module."""
    return module.replace(functions=tuple(transform(f) for f in module.functions))


# ---------------------------------------------------------------- pass spec text

_ITEM = re.compile(r"\s*([A-Za-z_][\w\-]*)\s*(?:\{([^{}]*)\})?\s*")
_KEY = re.compile(r"^[A-Za-z_]\w*$")


def parse_option_value(text: str) -> bool | int | float | str:
    """``true``/``false`` -> bool, then int, then float; anything else is a string
    (surrounding quotes are stripped)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _parse_options(spec: str, pass_name: str, body: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for part in body.split(","):
        if not part.strip():
            if body.strip():
                raise PassError(f"pass spec {spec!r}: empty option in {pass_name}{{{body}}}")
            continue
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not _KEY.match(key) or not value:
            raise PassError(f"pass spec {spec!r}: option {part.strip()!r} of pass {pass_name} "
                            f"is not of the form key=value")
        if key in options:
            raise PassError(f"pass spec {spec!r}: option {key!r} of pass {pass_name} given twice")
        options[key] = parse_option_value(value)
    return options


def parse_pass_spec(spec: str) -> list[Pass]:
    """Parses ``"name[{key=value,...}][,name...]"`` into pass objects, in order.

    An empty spec gives no passes. Unknown passes or options raise UnknownOptionError;
    malformed text raises PassError saying where.
    """
    passes: list[Pass] = []
    pos = 0
    if not spec.strip():
        return passes
    while True:
        m = _ITEM.match(spec, pos)
        if not m:
            raise PassError(f"pass spec {spec!r}: expected a pass name at position {pos} "
                            f"(form: name{{key=value,...}},name...)")
        name, body = m.group(1), m.group(2)
        options = _parse_options(spec, name, body) if body is not None else {}
        passes.append(get_pass(name, **options))
        pos = m.end()
        if pos == len(spec):
            return passes
        if spec[pos] != ",":
            raise PassError(f"pass spec {spec!r}: unexpected {spec[pos]!r} at position {pos} "
                            f"after pass {name}")
        pos += 1
