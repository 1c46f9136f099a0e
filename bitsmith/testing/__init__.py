"""Testing what plugs into bitsmith, as its authors would: random valid modules (hypothesis
strategies), a pass-conformance check and a backend-conformance suite.

A test dependency: needs the ``test`` extra (hypothesis, pytest), so ``import bitsmith`` never
imports this package. See docs/writing-a-backend.md.
"""

from __future__ import annotations

import importlib


def _missing_test_extra() -> list[str]:
    missing = []
    for name in ("hypothesis", "pytest"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


if _missing_test_extra():
    raise ImportError(f"bitsmith.testing needs {' and '.join(_missing_test_extra())}, from the `test` extra: "
                      f"pip install 'bitsmith[test]'")

from ..tolerance import Tolerance  # noqa: E402
from .conformance import ConformanceError, ConformanceReport, backend_conformance  # noqa: E402
from .conformance_suite import BackendConformanceSuite  # noqa: E402
from .pass_check import PassCheckError, PassCheckResult, check_pass  # noqa: E402
from .strategies import random_modules  # noqa: E402

__all__ = ["BackendConformanceSuite", "ConformanceError", "ConformanceReport", "PassCheckError",
           "PassCheckResult", "Tolerance", "backend_conformance", "check_pass", "random_modules"]
