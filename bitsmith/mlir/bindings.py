"""Lazy access to the MLIR Python bindings shipped by torch-mlir (the ``mlir`` extra).

``import bitsmith`` never imports them; the first export, import or run does, and a missing
package is a ``MLIRUnavailableError`` naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import BitsmithError

EXTRA = "mlir"
PACKAGE = "torch-mlir==20261001"


class MLIRUnavailableError(BitsmithError, ImportError):
    """The MLIR Python bindings (package torch-mlir) are not installed."""


class MLIRInteropError(BitsmithError):
    """An MLIR file or module that bitsmith cannot export, import or run; says what and where."""


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"torch_mlir.{name}")
    except ImportError as e:
        raise MLIRUnavailableError(
            f"MLIR interop needs the MLIR Python bindings from {PACKAGE}: install the extra with "
            f"`pip install -e \".[{EXTRA}]\"` (or `pip install {PACKAGE}`); import failed: {e}") from e


def ir() -> ModuleType:
    return _load("ir")


def passmanager() -> ModuleType:
    return _load("passmanager")


def execution_engine() -> ModuleType:
    return _load("execution_engine")


def runtime() -> ModuleType:
    return _load("runtime")


def new_context():
    """A fresh MLIR context that accepts the generic-form ``bitsmith`` dialect ops."""
    ctx = ir().Context()
    ctx.allow_unregistered_dialects = True
    return ctx
