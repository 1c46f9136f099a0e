"""Chat templates: the model's jinja template rendered over a list of messages.

The template comes from the artifact (``chat_template.jinja``, written at compile time from the
tokenizer config or the GGUF key ``tokenizer.chat_template``). It is rendered the way
transformers' ``apply_chat_template`` renders it, so prompts match what the model was trained
on: jinja2's ``ImmutableSandboxedEnvironment`` (a template is data from the artifact, never
trusted code), ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter that keeps non-ASCII text, and ``raise_exception`` / ``strftime_now`` globals;
the special tokens are passed as ``bos_token`` / ``eos_token``.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Sequence

from ..errors import BitsmithError


class ChatTemplateError(BitsmithError):
    """The artifact has no chat template, or its template fails to render these messages."""


def _raise(message: str) -> None:
    raise ChatTemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # a core dependency; named in case an install dropped it
        raise ChatTemplateError(f"chat templates need jinja2 (pip install jinja2): {e}") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"the artifact's chat template is not valid jinja: {e}") from None


def render_chat(template: str | None, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The prompt text for ``messages`` ([{"role": ..., "content": ...}, ...])."""
    if template is None:
        raise ChatTemplateError("this artifact carries no chat template (compiled from a model without one, "
                                "or by a bitsmith older than chat templates); use a raw prompt without --chat")
    from jinja2 import TemplateError
    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          bos_token=bos_token or "", eos_token=eos_token or "")
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template failed to render: {e}") from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError, MemoryError,
            RecursionError) as e:  # the template is the artifact's data: its failures are named
        raise ChatTemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None
