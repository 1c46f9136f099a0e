"""Backends: lower legal IR to a target program. Found through the ``bitsmith.backends`` entry points."""

from .base import ENTRY_POINT_GROUP, Backend, Executable, backend_for_target, backends, targets

__all__ = ["ENTRY_POINT_GROUP", "Backend", "Executable", "backend_for_target", "backends", "targets"]
