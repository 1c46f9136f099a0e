"""The KV caches of a ``DecodeBatch``'s rows: concatenated every step, or written in place.

Both keep the layout the attention mask describes (docs/ragged-batches.md): per layer one
cache [rows, kv_heads, columns, dim], each row right-aligned on a shared write column ``width``
(the longest row's length). Row r's tokens fill columns [width - length_r, width); the columns
before are zeros that the mask hides. A step writes every row's new key at column ``width``.

* ``ConcatRows``: ``main`` returns ``present = concat(past, new)``: every step copies every
  layer's whole cache into fresh arrays; admitting a row pads all caches to the new width.
* ``InplaceRows``: the artifact's in-place variant (``Executable.kv_session``, tvm-llvm and
  lut-cpu since backends/tvm/kv_inplace.py) over buffers [row capacity, kv_heads, capacity,
  dim] that the session owns. A step passes the first ``rows`` rows (a leading slice of a
  C-contiguous array: contiguous, same address, so the kernels write the buffers themselves)
  and a mask [rows, width + 1]; ``kv_write`` stores the new keys at column width, attention
  reads columns [0, width + 1) under the mask. Nothing is copied per token. Copies happen only
  when the layout changes: a longer row admitted moves the others right by the difference,
  a release moves the rows after it up one row and, when the longest row left, every row left
  to the new width, and the buffers grow geometrically (capacity and rows doubled, old
  contents copied once).

Why right alignment with one shared write column, not left alignment with per-row write
slots: the in-place variant already is the right-aligned one. Its ``kv_write`` writes slots
[t - seq, t) of every row, t being the mask's length, and its capacity attention reads each
row's keys under the mask with the causal diagonal anchored at t; a left-aligned batch would
need a ``kv_write`` with per-row offsets and an attention whose causal anchor and key count
differ per row: new kernels and a new plan variant, so every artifact compiled so far could
not use it. With the shared column the variant runs unchanged, and each step hands the kernels
exactly the columns and mask the concat path hands ``main`` (same zeros on the left, same
width), so a row's logits equal the concat path's bit for bit (tests/test_batch_inplace.py).
The cost, as on the concat path: every row's attention reads the longest row's width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from .generate import CacheSession, main_args, round_capacity

if TYPE_CHECKING:
    from .model import CompiledModel

SEQ_AXIS = 2  # caches are [batch, kv_heads, seq, dim]
INPLACE, CONCAT = "in place", "concat"


class RowCaches(Protocol):
    """The rows' caches, right-aligned on column ``width``; ``DecodeBatch`` keeps keys and lengths."""

    path: str     # INPLACE or CONCAT
    rows: int
    width: int

    def add(self, prefill: Sequence[np.ndarray]) -> None:
        """Appends a row whose caches are ``prefill`` (``main``'s presents for it alone, [1, h, n, d])."""

    def step(self, ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Every row's logits [rows, vocab] for ``ids`` [rows, 1]; the new keys land at column width."""

    def remove(self, row: int, width: int) -> None:
        """Drops ``row``; ``width``: the longest remaining length (columns before it are dropped)."""


def _pad_left(a: np.ndarray, width: int) -> np.ndarray:
    """``a`` [rows, heads, n, dim] with zero columns in front, to ``width`` columns."""
    extra = width - a.shape[SEQ_AXIS]
    if extra == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[SEQ_AXIS] = (extra, 0)
    return np.pad(a, pad)


class ConcatRows:
    """``main`` on concatenated caches: the path for artifacts and targets without the variant."""

    path = CONCAT

    def __init__(self, model: "CompiledModel") -> None:
        self.model = model
        self.caches: list[np.ndarray] = []

    @property
    def rows(self) -> int:
        return int(self.caches[0].shape[0]) if self.caches else 0

    @property
    def width(self) -> int:
        return int(self.caches[0].shape[SEQ_AXIS]) if self.caches else 0

    def add(self, prefill: Sequence[np.ndarray]) -> None:
        if not self.caches:
            self.caches = list(prefill)
            return
        width = max(self.width, prefill[0].shape[SEQ_AXIS])
        self.caches = [np.concatenate([_pad_left(old, width), _pad_left(new, width)])
                       for old, new in zip(self.caches, prefill)]

    def step(self, ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        args = main_args(self.model.module, ids, position_ids, self.caches, attention_mask)
        logits, *self.caches = self.model.run("main", args)
        return logits[:, -1]

    def remove(self, row: int, width: int) -> None:
        if self.rows == 1:
            self.caches = []
            return
        drop = self.width - width
        self.caches = [np.ascontiguousarray(np.delete(c, row, axis=0)[:, :, drop:]) for c in self.caches]


class InplaceRows:
    """The rows in a ``CacheSession``'s buffers, written in place (module docstring).

    ``max_rows`` and ``max_positions`` cap the geometric growth (None: uncapped); the buffers
    are dropped when the last row leaves, so an idle batch holds no cache memory."""

    path = INPLACE

    def __init__(self, session: CacheSession, max_rows: int | None = None, max_positions: int | None = None) -> None:
        self.session = session
        self.max_rows, self.max_positions = max_rows, max_positions
        self.rows = 0
        self.width = 0

    @property
    def row_capacity(self) -> int:
        return int(self.session.caches[0].shape[0]) if self.session.caches else 0

    @property
    def capacity(self) -> int:
        return int(self.session.caches[0].shape[SEQ_AXIS]) if self.session.caches else 0

    def _reserve(self, rows: int, columns: int) -> None:
        """Buffers of at least ``rows`` rows and ``columns`` columns, growing each geometrically
        (doubled, within the caps) and copying the live region once."""
        have_rows, have_cols = self.row_capacity, self.capacity
        if rows <= have_rows and columns <= have_cols:
            return
        if rows > have_rows:
            grown = max(rows, 2 * have_rows)
            have_rows = min(grown, max(rows, self.max_rows)) if self.max_rows is not None else grown
        if columns > have_cols:
            grown = round_capacity(max(columns, 2 * have_cols))
            have_cols = min(grown, max(columns, self.max_positions)) if self.max_positions is not None else grown
        old = self.session.caches
        self.session.start(have_rows, have_cols)  # zeros
        for a, b in zip(old, self.session.caches):
            b[:self.rows, :, :self.width] = a[:self.rows, :, :self.width]

    def add(self, prefill: Sequence[np.ndarray]) -> None:
        length = int(prefill[0].shape[SEQ_AXIS])
        width = max(self.width, length)
        self._reserve(self.rows + 1, width + 1)  # + 1: the next step's column
        shift = width - self.width
        for buf, new in zip(self.session.caches, prefill):
            if shift and self.rows:  # a longer row: the others move right, zeros in front
                live = buf[:self.rows]
                live[:, :, shift:width] = live[:, :, :self.width]  # overlapping: numpy copies via a buffer
                live[:, :, :shift] = 0
            row = buf[self.rows]
            row[:, :width - length] = 0  # the slot may hold a released row's keys
            row[:, width - length:width] = new[0]
        self.rows += 1
        self.width = width

    def step(self, ids: np.ndarray, position_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if attention_mask.shape != (self.rows, self.width + 1):
            raise ValueError(f"in-place batch step: mask {attention_mask.shape}, want "
                             f"{(self.rows, self.width + 1)} (rows, width + 1)")
        self._reserve(self.rows, self.width + 1)
        logits = self.session.step(ids, position_ids, attention_mask)
        self.width += 1
        return logits[:, -1]

    def remove(self, row: int, width: int) -> None:
        if not 0 <= row < self.rows or width > self.width:
            raise ValueError(f"remove: row {row} of {self.rows}, width {width} of {self.width}")
        if self.rows == 1:
            self.session.caches = []
            self.rows = self.width = 0
            return
        drop, old = self.width - width, self.width
        for buf in self.session.caches:
            if drop:  # the longest row left: every row moves left to the new width
                buf[:row, :, :width] = buf[:row, :, drop:old]
            buf[row:self.rows - 1, :, :width] = buf[row + 1:self.rows, :, drop:old]
        self.rows -= 1
        self.width = width


def row_caches(model: "CompiledModel", max_rows: int | None, max_positions: int | None) -> RowCaches:
    """In place where the executable offers a session and the model allows it
    (``CompiledModel.kv_inplace``), else concatenated."""
    session = model.executable.kv_session() if getattr(model, "kv_inplace", True) else None
    if session is None:
        return ConcatRows(model)
    return InplaceRows(session, max_rows, max_positions)
