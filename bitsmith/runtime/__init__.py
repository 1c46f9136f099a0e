"""Runtime: artifact format, executors and the generate loop. Never imports frontend or passes."""

from .model import CompiledModel, LanguageModelInfo

__all__ = ["CompiledModel", "LanguageModelInfo"]
