"""Hardware presets: the accelerator's clock, HBM, parallelism, buffers and energy constants as
data (``presets/*.json``, package data; a user's own file through ``--option preset=FILE.json``).
Fields are documented in docs/fpga-isa.md, "Presets"."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ...errors import OptionError

BUILTIN = ("u280", "vhk158")
_REQUIRED = {
    "clock_mhz": (), "slr": (),
    "hbm": ("channels", "bandwidth_gbs", "capacity_gb", "same_channel_efficiency", "cross_channel_efficiency",
            "weight_channels", "kv_channels", "act_channels", "latency_cycles"),
    "mm": ("m", "n", "k"), "mv": ("m", "n", "k"), "misc": ("lanes",),
    "buffers": ("A", "B", "GLOBAL", "META", "SCALE", "KV"),
    "energy_pj": ("hbm_per_byte", "sram_per_byte", "int8_mac", "fp32_mac", "misc_per_element", "static_w"),
}


class PresetError(OptionError):
    """A preset file that is missing, not JSON, or lacks/mistypes a field (named)."""


@dataclass(frozen=True)
class Preset:
    name: str
    data: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def clock_hz(self) -> float:
        return float(self.data["clock_mhz"]) * 1e6

    def hbm_bytes_per_cycle(self, channels: int, cross_channel: bool = False) -> float:
        """Sustained bytes per cycle over ``channels`` HBM channels (per-channel share of the
        peak bandwidth, times the same- or cross-channel efficiency)."""
        h = self.data["hbm"]
        eff = h["cross_channel_efficiency"] if cross_channel else h["same_channel_efficiency"]
        per_channel = h["bandwidth_gbs"] * 1e9 / h["channels"]
        return min(channels, h["channels"]) * per_channel * eff / self.clock_hz

    def buffer_bytes(self, name: str) -> int:
        b = self.data["buffers"][name]
        return int(b["depth"]) * int(b["width_bytes"])

    def macs_per_cycle(self, unit: str) -> int:
        p = self.data[unit]
        return int(p["m"]) * int(p["n"]) * int(p["k"]) * int(self.data["slr"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **dict(self.data)}


def _check(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise PresetError(f"{where}: a preset is a JSON object")
    for key, sub in _REQUIRED.items():
        if key not in data:
            raise PresetError(f"{where}: field {key!r} is missing")
        if not sub:
            if isinstance(data[key], bool) or not isinstance(data[key], (int, float)) or data[key] <= 0:
                raise PresetError(f"{where}: {key} must be a positive number, got {data[key]!r}")
            continue
        if not isinstance(data[key], dict):
            raise PresetError(f"{where}: {key} must be an object with fields {list(sub)}")
        for s in sub:
            v = data[key].get(s)
            if key == "buffers":
                if not isinstance(v, dict) or not all(isinstance(v.get(f), int) and v.get(f) > 0
                                                      for f in ("depth", "width_bytes")):
                    raise PresetError(f"{where}: buffers.{s} needs positive int depth and width_bytes")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and key != "energy_pj"):
                raise PresetError(f"{where}: {key}.{s} must be a positive number, got {v!r}")


def from_dict(data: Any, where: str = "preset") -> Preset:
    _check(data, where)
    return Preset(str(data.get("name", where)), {k: v for k, v in data.items() if k != "name"})


def load(name_or_path: str) -> Preset:
    """A built-in preset by name (``u280``, ``vhk158``) or a JSON file."""
    if name_or_path in BUILTIN:
        text = resources.files(__package__).joinpath(f"presets/{name_or_path}.json").read_text()
        where = f"built-in preset {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise PresetError(f"preset {name_or_path!r}: not a built-in preset ({', '.join(BUILTIN)}) "
                              f"and no such file")
        text, where = path.read_text(), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PresetError(f"{where}: not JSON ({e})") from None
    return from_dict(data, where)
