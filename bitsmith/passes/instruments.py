"""Pass instruments: hooks the PassManager calls around every pass (timing, printing, dumps)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO, Iterable

from bitsmith.ir import Module

from .base import Pass


class PassInstrument:
    """Base instrument; override either hook. ``module`` is the pass's input (before) or
    its verified output (after)."""

    def before_pass(self, p: Pass, module: Module) -> None:
        pass

    def after_pass(self, p: Pass, module: Module) -> None:
        pass


def module_text(module: Module) -> str:
    """The module's text form, or a short summary while the IR printer is unavailable."""
    try:  # imported lazily: the printer is optional here and may land after this module
        from bitsmith.ir.printer import print_module
    except ImportError:
        return _summary(module)
    return print_module(module)


def _summary(module: Module) -> str:
    lines = [f"module ({len(module.tensors)} tensors, {module.tensors.nbytes()} bytes)"]
    for fn in module.functions:
        params = ", ".join(f"%{p.name}: {p.type}" for p in fn.params)
        lines.append(f"func @{fn.name}({params}) {{")
        for n in fn.nodes:
            outs = ", ".join(f"%{o.name}: {o.type}" for o in n.outputs)
            ins = ", ".join(f"%{i}" for i in n.inputs)
            attrs = "".join(f" {k}={v!r}" for k, v in n.attrs)
            lines.append(f"  {outs} = {n.op}({ins}){attrs}")
        lines.append(f"  return {', '.join('%' + r for r in fn.results)}")
        lines.append("}")
    return "\n".join(lines) + "\n"


class PassTiming(PassInstrument):
    """Wall-clock seconds per pass name (summed when a pass runs more than once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def before_pass(self, p: Pass, module: Module) -> None:
        self._start = time.perf_counter()

    def after_pass(self, p: Pass, module: Module) -> None:
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + time.perf_counter() - self._start


class PrintAfter(PassInstrument):
    """Prints the module after the named passes (or after every pass with ``"all"``)."""

    def __init__(self, names: Iterable[str] | str = "all", stream: IO[str] | None = None) -> None:
        self.names = None if names == "all" else frozenset([names] if isinstance(names, str) else names)
        self.stream = stream  # None: sys.stderr at print time, so redirections take effect

    def after_pass(self, p: Pass, module: Module) -> None:
        if self.names is None or p.name in self.names:
            out = self.stream or sys.stderr
            out.write(f"// ----- IR after pass {p.name} -----\n{module_text(module)}")
            out.flush()


class DumpToFolder(PassInstrument):
    """Writes the module after each pass to ``<path>/NN-<pass name>.txt`` (NN counts from 01)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0

    def after_pass(self, p: Pass, module: Module) -> None:
        self.count += 1
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"{self.count:02d}-{p.name}.txt").write_text(module_text(module))
