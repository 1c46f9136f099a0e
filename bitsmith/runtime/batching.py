"""DecodeBatch: rows at different lengths sharing one decode step (continuous batching).

A row joins with ``admit`` (its prompt is prefilled and the logits after the last prompt
token come back), advances one token per ``step`` together with every other row, and leaves
with ``release``; rows join and leave only at token boundaries. The server's engine thread
drives it; it is not thread-safe.

A row's logits never depend on which other rows share the batch (batch invariance): this
version keeps one batch-1 KV cache per row and runs each row's step on its own, which is
invariant by construction. See docs/ragged-batches.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

import numpy as np

from .generate import empty_cache, positions

if TYPE_CHECKING:
    from .model import CompiledModel


@dataclass
class _Row:
    cache: list[np.ndarray]
    length: int


class DecodeBatch:
    """Rows at different lengths sharing one decode step; rows join and leave at token boundaries."""

    def __init__(self, model: "CompiledModel", max_rows: int | None = None):
        if not model.is_language_model:
            raise TypeError("DecodeBatch needs a causal language model artifact")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.max_rows = max_rows
        limit = model.module.attr("max_positions")
        self.max_positions: int | None = limit if isinstance(limit, int) else None
        self._rows: dict[Hashable, _Row] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def keys(self) -> list[Hashable]:
        return list(self._rows)

    def length(self, key: Hashable) -> int:
        """Tokens in the row's cache (prompt plus the tokens stepped so far)."""
        return self._row(key).length

    def _row(self, key: Hashable) -> _Row:
        try:
            return self._rows[key]
        except KeyError:
            raise KeyError(f"no row {key!r} in this batch") from None

    def admit(self, key: Hashable, prompt_ids: Sequence[int]) -> np.ndarray:
        """Prefills ``prompt_ids`` as a new row; returns float32 logits [vocab] after its last token."""
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("admit: the prompt must be a non-empty list of token ids")
        if key in self._rows:
            raise ValueError(f"admit: row {key!r} is already in the batch")
        if self.max_rows is not None and len(self._rows) >= self.max_rows:
            raise ValueError(f"admit: the batch is full ({self.max_rows} rows)")
        if self.max_positions is not None and ids.size > self.max_positions:
            raise ValueError(f"admit: the prompt has {ids.size} tokens, more than the model's "
                             f"{self.max_positions} positions")
        logits, *cache = self.model.run("main", [ids[None, :], positions(1, 0, ids.size),
                                                 *empty_cache(self.model.module, 1)])
        self._rows[key] = _Row(cache, int(ids.size))
        return np.asarray(logits[0, -1], dtype=np.float32)

    def step(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, np.ndarray]:
        """Feeds one token to every admitted row (the keys must equal the admitted set);
        returns each row's next logits [vocab]."""
        if set(tokens) != set(self._rows):
            missing = [k for k in self._rows if k not in tokens]
            extra = [k for k in tokens if k not in self._rows]
            raise ValueError(f"step: tokens must be given for exactly the admitted rows "
                             f"(missing {missing}, not admitted {extra})")
        for key in self._rows:
            if self.max_positions is not None and self._rows[key].length >= self.max_positions:
                raise ValueError(f"step: row {key!r} already holds the model's {self.max_positions} positions")
        out: dict[Hashable, np.ndarray] = {}
        for key, row in self._rows.items():
            token = np.array([[int(tokens[key])]], dtype=np.int64)
            logits, *row.cache = self.model.run("main", [token, positions(1, row.length, 1), *row.cache])
            row.length += 1
            out[key] = np.asarray(logits[0, -1], dtype=np.float32)
        return out

    def release(self, key: Hashable) -> None:
        """Drops the row and its cache; unknown keys raise KeyError."""
        self._row(key)
        del self._rows[key]
