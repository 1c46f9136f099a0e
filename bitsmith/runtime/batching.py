"""DecodeBatch: rows at different lengths sharing one decode step (continuous batching).

A row joins with ``admit`` (its prompt is prefilled alone, batch 1, and the logits after the
last prompt token come back), advances one token per ``step`` together with every other row,
and leaves with ``release``; rows join and leave only at token boundaries. The server's
engine thread drives it; it is not thread-safe.

Layout: one shared cache per layer, [rows, kv_heads, width, dim], each row right-aligned
(its tokens fill the last ``length`` columns; the columns before are zeros that the
attention mask hides). Every step writes every row's new key at the same column, so rows stay
right-aligned; admitting a longer row widens every row on the left, and releasing rows trims
the columns no row uses any more. Where the artifact has the in-place KV variant (tvm-llvm,
lut-cpu) the caches live in buffers with headroom that the kernels write in place; elsewhere
(reference, tvm-cuda, artifacts from before the variant, ``CompiledModel.kv_inplace=False``)
``main`` concatenates them every step. ``kv_cache`` says which; both give the same bits
(``batch_caches``, which also says why the layout suits the in-place kernels).

A row's logits do not depend on which other rows share the batch: hidden keys add exact
zeros to the attention sums, and the kernels' reductions run in an order fixed per row
(docs/ragged-batches.md, where the measurement and its cost are). Artifacts whose ``main``
has no attention mask (compiled before issue 14) cannot hold rows of different lengths in
one call: there each row steps on its own cache, batch 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

import numpy as np

from .batch_caches import RowCaches, row_caches
from .generate import empty_cache, has_attention_mask, main_args, positions

if TYPE_CHECKING:
    from .model import CompiledModel

PER_ROW = "per row (main has no attention mask: each row steps on its own batch-1 cache)"


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
        self.shared = has_attention_mask(model.module)
        self._keys: list[Hashable] = []          # row order of the shared arrays
        self._lengths: dict[Hashable, int] = {}
        self._rows: RowCaches = row_caches(model, max_rows, self.max_positions)  # shared: the rows' caches
        self._own: dict[Hashable, list[np.ndarray]] = {}  # not shared: each row's batch-1 cache

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[Hashable]:
        return list(self._keys)

    def length(self, key: Hashable) -> int:
        """Tokens in the row's cache (prompt plus the tokens stepped so far)."""
        try:
            return self._lengths[key]
        except KeyError:
            raise KeyError(f"no row {key!r} in this batch") from None

    @property
    def kv_cache(self) -> str:
        """How the rows' caches are kept: ``"in place"``, ``"concat"`` or per row (``PER_ROW``)."""
        return self._rows.path if self.shared else PER_ROW

    @property
    def width(self) -> int:
        """Columns of the shared cache: the longest row's length."""
        return max(self._lengths.values(), default=0)

    def admit(self, key: Hashable, prompt_ids: Sequence[int]) -> np.ndarray:
        """Prefills ``prompt_ids`` as a new row; returns float32 logits [vocab] after its last token."""
        ids = np.asarray(list(prompt_ids), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("admit: the prompt must be a non-empty list of token ids")
        if key in self._lengths:
            raise ValueError(f"admit: row {key!r} is already in the batch")
        if self.max_rows is not None and len(self) >= self.max_rows:
            raise ValueError(f"admit: the batch is full ({self.max_rows} rows)")
        if self.max_positions is not None and ids.size > self.max_positions:
            raise ValueError(f"admit: the prompt has {ids.size} tokens, more than the model's "
                             f"{self.max_positions} positions")
        module = self.model.module
        logits, *cache = self.model.run("main", main_args(module, ids[None, :], positions(1, 0, ids.size),
                                                          empty_cache(module, 1)))
        if self.shared:
            self._rows.add(cache)
        else:
            self._own[key] = list(cache)
        self._keys.append(key)
        self._lengths[key] = int(ids.size)
        return np.array(logits[0, -1], dtype=np.float32)  # a copy: a view would pin the run's whole output arena

    def step(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, np.ndarray]:
        """Feeds one token to every admitted row (the keys must equal the admitted set);
        returns each row's next logits [vocab]."""
        if set(tokens) != set(self._lengths) or len(tokens) != len(self._keys):
            missing = [k for k in self._keys if k not in tokens]
            extra = [k for k in tokens if k not in self._lengths]
            raise ValueError(f"step: tokens must be given for exactly the admitted rows "
                             f"(missing {missing}, not admitted {extra})")
        if not self._keys:
            return {}
        if self.max_positions is not None:
            full = [k for k in self._keys if self._lengths[k] >= self.max_positions]
            if full:
                raise ValueError(f"step: rows {full} already hold the model's {self.max_positions} positions")
        step = self._step_shared if self.shared else self._step_each
        logits = step(tokens)
        for key in self._keys:
            self._lengths[key] += 1
        # copies: a view would keep the step's whole output arena (on the concat path every
        # present cache with it) alive for as long as the caller keeps the logits
        return {key: np.array(logits[r], dtype=np.float32) for r, key in enumerate(self._keys)}

    def _step_shared(self, tokens: Mapping[Hashable, int]) -> np.ndarray:
        lengths = np.array([self._lengths[k] for k in self._keys], dtype=np.int64)
        width = self.width
        ids = np.array([[int(tokens[k])] for k in self._keys], dtype=np.int64)
        # row r's tokens fill the last lengths[r] columns, then the new token
        mask = (np.arange(width + 1)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
        return self._rows.step(ids, lengths[:, None], mask)

    def _step_each(self, tokens: Mapping[Hashable, int]) -> list[np.ndarray]:
        out = []
        for key in self._keys:
            token = np.array([[int(tokens[key])]], dtype=np.int64)
            args = main_args(self.model.module, token, positions(1, self._lengths[key], 1), self._own[key])
            logits, *self._own[key] = self.model.run("main", args)
            out.append(logits[0, -1])
        return out

    def release(self, key: Hashable) -> None:
        """Drops the row and its cache, and trims the columns no remaining row uses."""
        self.length(key)  # KeyError for an unknown row
        r = self._keys.index(key)
        self._keys.pop(r)
        del self._lengths[key]
        self._own.pop(key, None)
        if self.shared:
            self._rows.remove(r, self.width)
