"""OpenAI response bodies: completions, chat completions, their stream chunks, usage.

Shapes follow the OpenAI API reference (``text_completion``, ``chat.completion``,
``chat.completion.chunk``); a stream is server-sent events, one ``data: {json}`` per chunk,
ending with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Reply:
    """Identity shared by every chunk of one response."""

    kind: str      # "completion" or "chat"
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, kind: str, model: str) -> "Reply":
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)

    def _head(self, stream: bool) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, stream: bool, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            if stream:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def body(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        return {**self._head(False), "choices": [self._choice(text, finish, False)], "usage": usage}

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              include_usage: bool = False) -> dict[str, Any]:
        out = {**self._head(True), "choices": [self._choice(text, finish, True, first)]}
        if include_usage:  # OpenAI: every chunk carries usage null, the last one the counts
            out["usage"] = None
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (a dict as JSON, or a literal such as [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")
