"""PassManager: runs passes in order, verifies after each one, calls instruments."""

from __future__ import annotations

import time
from typing import Sequence

from bitsmith.errors import PassError
from bitsmith.ir import Module, VerificationError, verify_module

from .base import Pass, parse_pass_spec
from .instruments import PassInstrument


def _ran(names: list[str]) -> str:
    return f"passes run before it: {', '.join(names)}" if names else "it was the first pass"


def _verify_input(module: Module) -> None:
    try:
        verify_module(module)
    except VerificationError as e:
        raise PassError(f"the input module is ill-formed before any pass ran: {e}") from e


class PassManager:
    """Runs ``passes`` (Pass objects, or a spec string such as ``"cse,dce"``) on a module.

    With ``verify`` (True or "each") the input and every pass's output go through
    ``verify_module``; a pass that raises or leaves an ill-formed module becomes a PassError
    naming that pass and those run before it. ``verify="ends"`` checks only the input and the
    final module (verification is ~40% of a warm compile's pass time); when the final module is
    ill-formed the passes run again verifying after each, so the error names the same pass as
    "each" would (passes are deterministic functions of the module). ``timings`` lists (pass
    name, seconds) of the last run, verification excluded.
    """

    def __init__(self, passes: Sequence[Pass] | str, instruments: Sequence[PassInstrument] = (),
                 verify: bool | str = True) -> None:
        if verify not in (True, False, "each", "ends"):
            raise ValueError(f"verify must be True, False, 'each' or 'ends', got {verify!r}")
        self.passes: tuple[Pass, ...] = tuple(parse_pass_spec(passes) if isinstance(passes, str) else passes)
        self.instruments = tuple(instruments)
        self.verify = verify
        self.timings: list[tuple[str, float]] = []

    def run(self, module: Module) -> Module:
        if self.verify != "ends":
            return self._run(module, each=bool(self.verify))
        _verify_input(module)
        try:
            out = self._run(module, each=False)
            verify_module(out)
        except (PassError, VerificationError) as e:
            # a pass broke the module (or a later pass tripped over it): run again verifying after
            # each pass, whose error names the culprit; instruments saw the first run only
            PassManager(self.passes, verify=True).run(module)
            if isinstance(e, PassError):
                raise
            raise PassError(f"the passes left an ill-formed module, but not when verified one by one "
                            f"(a pass that is not deterministic?): {e}") from e
        return out

    def _run(self, module: Module, each: bool) -> Module:
        self.timings = []
        if each:
            _verify_input(module)
        ran: list[str] = []
        for p in self.passes:
            for inst in self.instruments:
                inst.before_pass(p, module)
            start = time.perf_counter()
            try:
                out = p.apply(module)
            except Exception as e:  # any failure inside a pass is reported as that pass's
                raise PassError(f"pass {p.name!r} failed ({_ran(ran)}): {type(e).__name__}: {e}") from e
            self.timings.append((p.name, time.perf_counter() - start))
            if not isinstance(out, Module):
                raise PassError(f"pass {p.name!r} returned {type(out).__name__}, not a Module ({_ran(ran)})")
            if each and out is not module:  # an unchanged module was verified already
                try:
                    verify_module(out)
                except VerificationError as e:
                    raise PassError(f"pass {p.name!r} left an ill-formed module ({_ran(ran)}): {e}") from e
            for inst in self.instruments:
                inst.after_pass(p, out)
            module = out
            ran.append(p.name)
        return module
