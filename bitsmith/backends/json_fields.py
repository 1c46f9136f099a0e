"""Typed access to a JSON document read from an artifact file, every failure naming file and field.

Backends decode their index files (tvm ``plan.json``, lut ``program.json``) through ``Field``:
``doc["functions"][0]["steps"].list()`` either returns what the code needs or raises
``ArtifactError(file, "functions[0].steps: expected a list, got ...")``. So a missing key,
a wrong type or a bad range can never surface as KeyError / TypeError / IndexError.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from ..errors import ArtifactError


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Field:
    """A JSON value at ``path`` inside artifact file ``file``."""

    __slots__ = ("value", "file", "path")

    def __init__(self, value: Any, file: str, path: str = "") -> None:
        self.value, self.file, self.path = value, file, path

    def fail(self, problem: str) -> NoReturn:
        raise ArtifactError(self.file, f"{self.path or '(top level)'}: {problem}")

    def _child(self, value: Any, step: str) -> "Field":
        """``step`` is a key (joined with ".") or an index written "[i]" (appended as is)."""
        if step.startswith("["):
            return Field(value, self.file, self.path + step)
        return Field(value, self.file, f"{self.path}.{step}" if self.path else step)

    # --- structure
    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def __getitem__(self, key: str | int) -> "Field":
        if isinstance(key, int):
            items = self.list()
            if not 0 <= key < len(items):
                self.fail(f"expected at least {key + 1} items, got {len(items)}")
            return items[key]
        obj = self.obj()
        if key not in obj:
            self.fail(f"missing field {key!r}")
        return self._child(obj[key], key)

    def obj(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            self.fail(f"expected an object, got {_show(self.value)}")
        return self.value

    def list(self, length: int | None = None) -> list["Field"]:
        if not isinstance(self.value, list):
            self.fail(f"expected a list, got {_show(self.value)}")
        if length is not None and len(self.value) != length:
            self.fail(f"expected {length} items, got {len(self.value)}")
        return [self._child(v, f"[{i}]") for i, v in enumerate(self.value)]

    # --- scalars
    def int(self, lo: int | None = None, hi: int | None = None) -> int:
        """An integer (not a bool) in [lo, hi] where given."""
        v = self.value
        if not _is_int(v):
            self.fail(f"expected an integer, got {_show(v)}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(f"{v} is outside [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]")
        return v

    def ints(self, lo: int | None = None, hi: int | None = None, length: int | None = None) -> list[int]:
        return [f.int(lo, hi) for f in self.list(length)]

    def str(self, pattern: "re.Pattern[str] | None" = None, choices: tuple[str, ...] | None = None) -> str:
        v = self.value
        if not isinstance(v, str):
            self.fail(f"expected a string, got {_show(v)}")
        if pattern is not None and not pattern.fullmatch(v):
            self.fail(f"{_show(v)} is not of the form {pattern.pattern[:60]}")
        if choices is not None and v not in choices:
            self.fail(f"{_show(v)} is not one of {list(choices)}")
        return v

    def bool(self) -> bool:
        if not isinstance(self.value, bool):
            self.fail(f"expected true or false, got {_show(self.value)}")
        return self.value

    def number(self) -> int | float | bool:
        v = self.value
        if not isinstance(v, (int, float, bool)):
            self.fail(f"expected a number, got {_show(v)}")
        return v


def parse(data: bytes, file: str) -> Field:
    """Strict JSON (UTF-8, no NaN/Infinity, no duplicate keys) of an artifact file, as a Field."""
    from ..runtime.manifest import strict_json
    try:
        return Field(strict_json(bytes(data)), file)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(file, f"not valid JSON: {str(e)[:200]}") from None
