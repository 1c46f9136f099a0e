"""Testing what plugs into bitsmith, as its authors would: random valid modules (hypothesis
strategies), a pass-conformance check and a backend-conformance suite.

A test dependency: needs the ``test`` extra (hypothesis, pytest), so ``import bitsmith`` never
imports this package. See docs/writing-a-backend.md.
"""

from __future__ import annotations

import importlib.util

_missing = [name for name in ("hypothesis", "pytest") if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"bitsmith.testing needs {' and '.join(_missing)}, from the `test` extra: "
                      f"pip install 'bitsmith[test]'")

from ..tolerance import Tolerance  # noqa: E402
from .backend_conformance import ConformanceError, ConformanceReport, backend_conformance  # noqa: E402
from .conformance_suite import BackendConformanceSuite  # noqa: E402
from .pass_check import PassCheckError, PassCheckResult, check_pass  # noqa: E402
from .strategies import random_modules  # noqa: E402

__all__ = ["BackendConformanceSuite", "ConformanceError", "ConformanceReport", "PassCheckError",
           "PassCheckResult", "Tolerance", "backend_conformance", "check_pass", "random_modules"]
