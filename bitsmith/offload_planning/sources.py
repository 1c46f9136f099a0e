"""Where a module to plan comes from: a synthetic shape name, a config.json, an artifact
directory, or a model the frontend captures (a zoo name, a Hugging Face directory, a GGUF).

Every source ends as a decode module with its attention outlined by
``partition{pattern=attention_kv}`` (an artifact already partitioned is used as it is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError
from ..ir import Module, parse_module
from ..passes import PassManager, parse_pass_spec
from .synthetic import SHAPES, shape_from_file, synthetic_llama

PARTITION = "partition{pattern=attention_kv}"
CLEANUP = ("dce", "cse", "fold", "dce")  # what compile runs before its own passes


def _run(module: Module, specs: list[str]) -> Module:
    return PassManager([p for s in specs for p in parse_pass_spec(s)]).run(module)


def partitioned(module: Module) -> Module:
    """``module`` with attention outlined (unchanged when it already has partition callees)."""
    if any(f.attr("partition") is not None for f in module.functions):
        return module
    return _run(module, [PARTITION])


def from_artifact(path: Path) -> Module:
    """The IR an artifact's manifest records, with its constants declared (no data read)."""
    manifest = path / "manifest.json"
    try:
        body = json.loads(manifest.read_text(encoding="utf-8"))
        text = body["ir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(str(manifest), f"cannot read its IR ({type(e).__name__}: {e})") from None
    return partitioned(parse_module(text, declared_only=True))


def from_frontend(model: str, progress: Callable[[str], None]) -> Module:
    """Captures ``model`` (needs the frontend extra) and adds its KV cache, as compile does."""
    from ..frontend import capture
    captured = capture(model, progress=progress)
    return _run(captured.module, list(captured.passes) + list(CLEANUP) + [PARTITION])


def load_model(model: str, progress: Callable[[str], None] = lambda m: None) -> tuple[str, Module]:
    """(display name, partitioned decode module) for ``model``: a name in ``SHAPES``, a
    ``config.json`` file, an artifact directory (with manifest.json), or anything the frontend
    loads."""
    if model in SHAPES:
        return model, partitioned(synthetic_llama(SHAPES[model], model))
    path = Path(model)
    if path.is_file() and path.suffix == ".json":
        return path.stem, partitioned(synthetic_llama(shape_from_file(path), path.stem))
    if path.is_dir() and (path / "offload.json").exists():
        raise ArtifactError(str(path), "is an offloaded artifact (offload.json): its two programs no longer hold "
                                       "the whole decode step; plan from the model it was compiled from, or from "
                                       "an artifact compiled without --offload-attention")
    if path.is_dir() and (path / "manifest.json").exists():
        return path.resolve().name, from_artifact(path)
    return model, from_frontend(model, progress)
