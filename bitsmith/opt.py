"""Running passes on IR text, as ``bitsmith opt`` does: read, run, report new constants.

The text names constants by shape and sha256 only, so a module read without a weights file
has a :class:`~bitsmith.ir.declared_tensors.DeclaredTensorTable`: passes that only move nodes
(cse, dce) run on it; a pass that reads a declared constant's data fails with
:class:`TensorDataRequiredError` naming the pass and the constant (``fold`` too: it says so
rather than skipping the constant). A ``.safetensors`` file gives the data, each tensor checked
against the sha256 the text declares.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import os
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import PassError
from .ir import Module, TensorInfo, TensorType, parse_module
from .ir.declared_tensors import DeclaredTensorTable, TensorDataUnavailableError
from .passes import PASSES, Pass, PassInstrument, PassManager, PrintAfter


class TensorDataRequiredError(PassError):
    """A pass read the data of a constant that is known by shape and sha256 only."""

    def __init__(self, pass_name: str, info: TensorInfo) -> None:
        self.pass_name, self.info = pass_name, info
        super().__init__(f"pass {pass_name!r} needs the data of constant {info.name!r} "
                         f"({TensorType(info.shape, info.dtype)}, sha256 {info.sha256[:16]}...), but the IR text "
                         f"knows it by shape and sha256 only: give --tensors WEIGHTS.safetensors holding it")


def load_module(text: str, tensors: str | os.PathLike | None = None) -> Module:
    """The module of IR ``text``; its constants get their data from the safetensors file
    ``tensors`` where it holds them (checked against the text's sha256), else stay declared."""
    module = parse_module(text, declared_only=True)
    if tensors is None:
        return module
    table = typing.cast(DeclaredTensorTable, module.tensors)
    return module.replace(tensors=table.with_data(read_safetensors(tensors, set(table)), str(tensors)))


def read_safetensors(path: str | os.PathLike, names: set[str]) -> dict[str, np.ndarray]:
    """The tensors of ``path`` whose names are in ``names`` (the others are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {n: f.get_tensor(n) for n in f.keys() if n in names}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


class _CurrentPass(PassInstrument):
    def __init__(self) -> None:
        self.name = ""

    def before_pass(self, p: Pass, module: Module) -> None:
        self.name = p.name


def run_pipeline(module: Module, passes: Sequence[Pass] | str, print_after_all: bool = False) -> Module:
    """Runs ``passes`` with verification after each; ``print_after_all`` prints the IR after
    each pass to stderr under a header naming the pass."""
    current = _CurrentPass()
    instruments: list[PassInstrument] = [current] + ([PrintAfter("all")] if print_after_all else [])
    try:
        return PassManager(passes, instruments=instruments, verify=True).run(module)
    except PassError as e:
        missing = _missing_data(e)
        if missing is not None:
            raise TensorDataRequiredError(current.name, missing.info) from e
        raise


def _missing_data(error: BaseException) -> TensorDataUnavailableError | None:
    """The TensorDataUnavailableError behind ``error`` (it may be wrapped more than once)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, TensorDataUnavailableError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def tensors_with_data(module: Module) -> dict[str, np.ndarray]:
    table = module.tensors
    if isinstance(table, DeclaredTensorTable):
        return table.arrays()
    return {n: table[n] for n in table}


def new_constants(before: Module, after: Module) -> list[str]:
    """Tensors of ``after`` that ``before`` does not hold with the same name and hash."""
    old = set(before.tensors.infos())
    return [i.name for i in after.tensors.infos() if i not in old]


def write_safetensors(arrays: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes ``arrays`` to ``path`` atomically (a temp file in its folder, then a rename)."""
    import safetensors.numpy

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.numpy.save_file({n: np.ascontiguousarray(a) for n, a in sorted(arrays.items())}, str(tmp))
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; an output file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- --list-passes

@dataclass(frozen=True)
class PassOption:
    name: str
    type: str
    default: Any
    from_text: bool  # settable in a pass spec (bool, int, float, str, tuple of str)


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def described_options(cls: type[Pass]) -> tuple[PassOption, ...]:
    """The pass's dataclass fields with their types and defaults."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        t = hints.get(f.name, Any)
        out.append(PassOption(f.name, _type_name(t), default,
                              t in (bool, int, float, str) or t == tuple[str, ...]))
    return tuple(out)


def pass_summary(cls: type[Pass]) -> str:
    """First docstring line: the pass module's when it holds only this pass (pass modules
    open with what the pass does), else the class's own."""
    module = sys.modules.get(cls.__module__)
    alone = sum(c.__module__ == cls.__module__ for c in PASSES.values()) == 1
    own = cls.__doc__ if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else None
    doc = (module.__doc__ if alone and module is not None and module.__doc__ else None) or own or ""
    line = inspect.cleandoc(doc).split("\n", 1)[0] if doc else "(no description)"
    line = re.sub(r"^Pass ``[\w-]+``:\s*", "", line)  # the listing names the pass already
    return line[:1].upper() + line[1:]


def describe_passes() -> str:
    """Every registered pass, its summary and its options with types and defaults."""
    lines = []
    width = max((len(n) for n in PASSES), default=0)
    for name in sorted(PASSES):
        cls = PASSES[name]
        lines.append(f"{name:<{width}}  {pass_summary(cls)}")
        for o in described_options(cls):
            note = "" if o.from_text else "  (API only)"
            lines.append(f"    {o.name}: {o.type} = {o.default!r}{note}")
    return "\n".join(lines) + "\n"
