"""Shared helpers of the fpga backend tests: build fpga programs from an already-compiled
(reference) module without capturing the model again."""

from __future__ import annotations

from typing import Any

from bitsmith.backends.base import backend_for_target, check_legal
from bitsmith.passes import PassManager


def fpga_build(module: Any, target: str = "fpga-u280", **options: Any) -> Any:
    backend = backend_for_target(target)
    resolved = {**backend.option_defaults(target), **options}
    lowered = PassManager(",".join(backend.pipeline(target, resolved).specs())).run(module)
    check_legal(lowered, backend.legal_ops(target, resolved), target)
    return backend.build(lowered, target, resolved), lowered
