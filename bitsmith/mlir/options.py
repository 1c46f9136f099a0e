"""What an export may choose: where weights live and how attention is written."""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_FORMS = ("bitsmith", "linalg")


@dataclass(frozen=True)
class ExportOptions:
    """``inline_weights``: constants as ``arith.constant dense<...>`` in the function (the
    file then carries every weight; needed to run it in MLIR's ExecutionEngine). Otherwise a
    constant is an ``ml_program.global`` with an ``#ml_program.extern`` value that names the
    artifact's tensor and its sha256, except constants of at most ``inline_max_elements``
    elements, which stay inline. ``attention``: "bitsmith" keeps ``bitsmith.attention`` (a
    backend's KV-cache kernel), "linalg" writes it out as contractions and a softmax."""

    inline_weights: bool = False
    inline_max_elements: int = 1
    attention: str = "bitsmith"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"attention form {self.attention!r}; known: {', '.join(ATTENTION_FORMS)}")
        if self.inline_max_elements < 0:
            raise ValueError("inline_max_elements must be >= 0")
