"""Which datatype each quantized layer of a saved artifact chose, read without loading it.

For every ``qlinear`` of an artifact this counts the weight groups per candidate grid of its
scheme: schemes with several candidates (``bitmod-w3``/``bitmod-w4``) store a per-group
selector, decoded here; single-grid schemes use their one grid for every group.

Only ``manifest.json`` (its self-hash checked) and the selector tensors of
``weights.safetensors`` are read, with ``safetensors.numpy``; each selector tensor is checked
against the manifest's sha256. Nothing is executed: no backend, no native code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from ..ir import IRParseError, Module, parse_module
from ..ir.quant_grids import get_scheme
from ..ir.code_packing import group_count, unpack_codes
from ..ir.graph import sha256_of
from ..ir.quantized import kept_per_row, operand_types, qlinear_nodes
from .manifest import WEIGHTS, read_manifest

# The IR text's tensor lines need the data to be checked; the structure alone parses without.
_TENSOR_LINE = re.compile(r"^\s*tensor\s+\".*$\n?", re.MULTILINE)


@dataclass(frozen=True)
class LayerDatatypes:
    """Group counts per candidate grid of one quantized layer (grid names in scheme order)."""

    layer: str
    scheme: str
    groups: dict[str, int]

    @property
    def shares(self) -> dict[str, float]:
        total = sum(self.groups.values())
        return {name: (count / total if total else 0.0) for name, count in self.groups.items()}


def _structure(manifest: dict) -> Module:
    try:
        return parse_module(_TENSOR_LINE.sub("", manifest["ir"]))
    except IRParseError as e:
        raise ArtifactError("manifest.json", f"ir: does not parse: {e}") from None


def _selector_names(module: Module) -> list[tuple[str, dict, str | None]]:
    """(layer label, qlinear attrs, selector tensor name or None) for each distinct qlinear."""
    out, seen = [], set()
    for _, node, constants in qlinear_nodes(module):
        attrs = node.attr_dict
        roles = [role for role, _ in operand_types(attrs)]
        selector = None
        if "selectors" in roles:
            operand = node.inputs[1 + roles.index("selectors")]
            selector = constants.get(operand)
            if selector is None:
                raise ArtifactError("manifest.json", f"ir: qlinear selectors {operand} are not a constant")
        codes = constants.get(node.inputs[1], node.inputs[1])
        label = (node.loc.module_path if node.loc is not None else "") or codes
        key = (label, selector or codes)
        if key in seen:  # the same layer in another function (e.g. prefill and decode)
            continue
        seen.add(key)
        out.append((label, attrs, selector))
    return out


def layer_datatypes(path: str | os.PathLike[str]) -> list[LayerDatatypes]:
    """Per quantized layer of the artifact at ``path``, in graph order, its groups per grid."""
    root = Path(path)
    manifest = read_manifest(root)
    listed = {t["name"]: t for t in manifest["tensors"]}
    layers = _selector_names(_structure(manifest))
    wanted = [sel for _, _, sel in layers if sel is not None]
    selectors: dict[str, np.ndarray] = {}
    if wanted:
        from safetensors import SafetensorError, safe_open

        from .artifact_files import check_size, open_file
        file = root / WEIGHTS
        fd = open_file(root, WEIGHTS)  # a regular file inside the artifact, never a link
        try:
            check_size(fd, str(file), manifest["files"][WEIGHTS]["size"])
            with safe_open(f"/proc/self/fd/{fd}", framework="numpy") as f:  # that very file
                for name in wanted:
                    selectors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, KeyError) as e:
            raise ArtifactError(str(file), f"cannot read selector tensors: {e}") from None
        finally:
            os.close(fd)
        for name, arr in selectors.items():
            if name not in listed or sha256_of(arr) != listed[name]["sha256"]:
                raise ArtifactError(str(file), f"tensor {name!r} does not match the manifest's sha256")
    result = []
    for label, attrs, selector in layers:
        scheme = get_scheme(attrs["scheme"])
        names = [g.name for g in scheme.candidates]
        groups = group_count(kept_per_row(attrs["in_features"], attrs["sparsity"]), attrs["group_size"])
        if selector is None:
            counts = [groups * attrs["out_features"]] + [0] * (len(names) - 1)
        else:
            chosen = unpack_codes(selectors[selector], scheme.selector_bits, groups)
            counts = np.bincount(chosen.reshape(-1), minlength=len(names)).tolist()
            if len(counts) > len(names):
                raise ArtifactError(str(root / WEIGHTS), f"tensor {selector!r} selects a grid the scheme "
                                                         f"{scheme.name} does not have")
        result.append(LayerDatatypes(label, scheme.name, dict(zip(names, (int(c) for c in counts)))))
    return result
