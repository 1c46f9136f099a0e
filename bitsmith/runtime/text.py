"""Text around generation: stop strings and incremental detokenization for streaming.

Streaming decodes the whole generated sequence each step and emits the new suffix of the
text: a token that is half of a UTF-8 character (byte-level BPE) decodes to U+FFFD until the
rest arrives, so a trailing replacement character is held back, and text is never emitted
twice or out of order. Text that could be the start of a stop string is held back too, and a
stop string and what follows it are never emitted (OpenAI's ``stop`` semantics).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

_PARTIAL = "\ufffd"


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stop_string_check(decode: Callable[[list[int]], str], prompt_len: int,
                      stop: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A ``decode_generate`` stop check: True for each row whose generated text holds a stop string."""
    stop = [s for s in stop if s]

    def check(ids: np.ndarray) -> np.ndarray:
        return np.array([cut_at_stop(decode([int(t) for t in row[prompt_len:]]), stop)[1] for row in ids])
    return check


class TextStreamer:
    """A ``decode_generate`` streamer for one row: calls ``write`` with each new piece of text.

    ``decode`` maps token ids to text (e.g. a tokenizer's decode skipping special tokens);
    ``text`` is everything emitted, cut at the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], Any],
                 stop: Sequence[str] = ()) -> None:
        self.decode, self.write, self.stop = decode, write, [s for s in stop if s]
        self.ids: list[int] | None = None  # None until the prompt has been put
        self.text, self.stopped = "", False

    def put(self, value: np.ndarray) -> None:
        value = np.asarray(value)
        if self.ids is None:  # the prompt comes first, and is not echoed
            self.ids = []
            return
        if value.size != 1:
            raise ValueError(f"TextStreamer streams one sequence, got a batch of {value.size}")
        self.ids.append(int(value.reshape(-1)[0]))
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        if self.stopped or self.ids is None:
            return
        full, self.stopped = cut_at_stop(self.decode(self.ids), self.stop)
        ready = full
        if not (final or self.stopped):
            # drop a half-decoded character first: a stop string's start before it must be
            # held back too (stop "a€" over tokens "a", b"\xe2\x82", b"\xac")
            ready = full.rstrip(_PARTIAL)
            ready = ready[:len(ready) - _held_back(ready, self.stop)]
        if ready.startswith(self.text) and len(ready) > len(self.text):
            self.write(ready[len(self.text):])
            self.text = ready
