"""Device and link presets as data: ``presets.json`` in this package plus a user's own file.

Every number carries its source as a string (a datasheet, a paper's table, a list price, or
a measurement on a named machine): nothing is looked up at run time. A user file has the
same format; its entries add to or replace the built-in ones by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import BitsmithError, UnknownOptionError

FORMAT = "bitsmith-offload-presets/1"
BUILTIN = "presets.json"


class PresetError(BitsmithError):
    """A presets file that cannot be used; the message names the file and the field."""

    def __init__(self, file: str, field: str, problem: str) -> None:
        self.file, self.field = file, field
        super().__init__(f"presets file {file}: {field}: {problem}")


@dataclass(frozen=True)
class DevicePreset:
    """One accelerator (or server): the roofline's two ceilings, its memory and its price."""

    name: str
    description: str
    peak_flops: float  # FLOP/s (fp16 dense for GPUs; what the CPU targets run for a CPU)
    memory_bandwidth: float  # bytes/s
    memory_bytes: float
    dollars_per_hour: float
    source: str
    price_source: str
    op_overhead: float = 0.0  # seconds per op on top of its roofline (dispatch, launch); optional


@dataclass(frozen=True)
class LinkPreset:
    """A network link between a compute device and an attention device."""

    name: str
    bandwidth: float  # bytes/s, each direction
    latency: float  # seconds per message
    source: str


@dataclass(frozen=True)
class Presets:
    devices: Mapping[str, DevicePreset]
    links: Mapping[str, LinkPreset]

    def device(self, name: str) -> DevicePreset:
        if name not in self.devices:
            raise UnknownOptionError("device preset", name, sorted(self.devices))
        return self.devices[name]

    def link(self, name: str) -> LinkPreset:
        if name not in self.links:
            raise UnknownOptionError("link preset", name, sorted(self.links))
        return self.links[name]


_DEVICE_NUMBERS = ("peak_flops", "memory_bandwidth", "memory_bytes", "dollars_per_hour")
_DEVICE_TEXTS = ("description", "source", "price_source")
_DEVICE_KEYS = frozenset(_DEVICE_NUMBERS + _DEVICE_TEXTS + ("op_overhead",))
_LINK_KEYS = frozenset({"bandwidth", "latency", "source"})


def _number(file: str, field: str, entry: Mapping[str, Any], key: str, allow_zero: bool = False) -> float:
    if key not in entry:
        raise PresetError(file, f"{field}.{key}", "missing")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PresetError(file, f"{field}.{key}", f"must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise PresetError(file, f"{field}.{key}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _text(file: str, field: str, entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise PresetError(file, f"{field}.{key}", "missing or not a non-empty string (every number needs its source)")
    return value


def _section(file: str, data: Mapping[str, Any], key: str, known: frozenset[str]) -> Mapping[str, Any]:
    section = data.get(key, {})
    if not isinstance(section, dict):
        raise PresetError(file, key, f"must be an object of named entries, got {type(section).__name__}")
    for name, entry in section.items():
        if not isinstance(entry, dict):
            raise PresetError(file, f"{key}.{name}", f"must be an object, got {type(entry).__name__}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise PresetError(file, f"{key}.{name}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")
    return section


def parse_presets(text: str, file: str) -> Presets:
    """Presets from the JSON ``text`` of ``file`` (named in every error)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PresetError(file, "(file)", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise PresetError(file, "(file)", "must hold a JSON object")
    if data.get("format") != FORMAT:
        raise PresetError(file, "format", f"must be {FORMAT!r}, got {data.get('format')!r}")
    unknown = sorted(set(data) - {"format", "devices", "links"})
    if unknown:
        raise PresetError(file, unknown[0], "unknown key (known: format, devices, links)")
    devices = {}
    for name, e in _section(file, data, "devices", _DEVICE_KEYS).items():
        field = f"devices.{name}"
        numbers = {k: _number(file, field, e, k, allow_zero=k == "dollars_per_hour") for k in _DEVICE_NUMBERS}
        texts = {k: _text(file, field, e, k) for k in _DEVICE_TEXTS}
        if "op_overhead" in e:
            numbers["op_overhead"] = _number(file, field, e, "op_overhead", allow_zero=True)
        devices[name] = DevicePreset(name, **texts, **numbers)
    links = {}
    for name, e in _section(file, data, "links", _LINK_KEYS).items():
        field = f"links.{name}"
        links[name] = LinkPreset(name, _number(file, field, e, "bandwidth"),
                                 _number(file, field, e, "latency", allow_zero=True), _text(file, field, e, "source"))
    return Presets(devices, links)


def builtin_presets() -> Presets:
    text = resources.files(__package__).joinpath(BUILTIN).read_text(encoding="utf-8")
    return parse_presets(text, f"bitsmith/offload_planning/{BUILTIN}")


def load_presets(extra: str | Path | None = None) -> Presets:
    """The built-in presets, with the entries of the file ``extra`` (if given) added or replacing."""
    base = builtin_presets()
    if extra is None:
        return base
    path = Path(extra)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PresetError(str(path), "(file)", f"cannot be read: {e.strerror or e}") from None
    user = parse_presets(text, str(path))
    return Presets({**base.devices, **user.devices}, {**base.links, **user.links})
