"""OpenAI request bodies checked and turned into one ``GenerationRequest``, or an ``APIError``.

The checks follow the OpenAI API reference (completions and chat completions): a field of the
wrong JSON type, a value out of OpenAI's range, or a feature this server does not implement
(``n`` > 1, ``logprobs``, ``echo``, penalties, ``logit_bias``, tools, ...) is a 400 naming the
field; unknown fields are ignored, as OpenAI ignores them. Defaults are OpenAI's: temperature
1, top_p 1 (so requests sample unless ``temperature`` is 0), ``max_tokens`` 16 on completions
and the rest of the context on chat. ``top_k``, ``min_p`` and ``repetition_penalty`` are
accepted as extensions (as vLLM does; the ``openai`` client sends them with ``extra_body``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..runtime.sampling import SamplingConfig

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4                # OpenAI's limit on `stop`
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, what: str) -> APIError:
    return invalid(param, f"{param}: {what} is not supported by this server", "unsupported_value")


@dataclass(frozen=True)
class ModelContext:
    """What validation needs to know about the served model."""

    model_id: str
    vocab_size: int
    max_positions: int | None
    encode: Callable[[str], list[int]]
    chat_prompt: Callable[[list[dict[str, Any]]], str]   # raises ValueError when it cannot render


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: what the engine generates and how the reply is shaped."""

    kind: str                      # "completion" or "chat"
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


_JSON_TYPE = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "an array", dict: "an object"}


def _get(body: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """``body[name]`` checked to be of JSON type ``kind`` (null or absent: ``default``).
    JSON booleans are never numbers; integers are numbers."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise invalid(name, f"{name} must be {_JSON_TYPE[kind]}, got {type(value).__name__} {value!r:.40}",
                      "invalid_type")
    return value


def _in_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if not ((lo < value if lo_open else lo <= value) and value <= hi):
        raise invalid(name, f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")


def _refuse_unsupported(body: Mapping[str, Any], chat: bool) -> None:
    """OpenAI features this server does not implement: their default values pass, others 400."""
    n = _get(body, "n", int, 1)
    if n != 1:
        raise unsupported("n", f"n={n} (only n=1)")
    if chat:
        if _get(body, "logprobs", bool, False):
            raise unsupported("logprobs", "logprobs")
        if _get(body, "top_logprobs", int) is not None:
            raise unsupported("top_logprobs", "top_logprobs")
        if _get(body, "tools", list) or _get(body, "functions", list):
            raise unsupported("tools", "tool and function calling")
        choice = body.get("tool_choice", body.get("function_call"))
        if choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool_choice other than none/auto")
        fmt = _get(body, "response_format", dict)
        if fmt is not None and fmt.get("type") != "text":
            raise unsupported("response_format", f"response_format {fmt.get('type')!r} (only text)")
    else:
        if _get(body, "logprobs", int) is not None:
            raise unsupported("logprobs", "logprobs")
        if _get(body, "echo", bool, False):
            raise unsupported("echo", "echo")
        if _get(body, "suffix", str):
            raise unsupported("suffix", "suffix (insertion)")
        if _get(body, "best_of", int, 1) != 1:
            raise unsupported("best_of", "best_of other than 1")
    for name in ("presence_penalty", "frequency_penalty"):
        value = _get(body, name, float, 0.0)
        _in_range(name, value, -2.0, 2.0)
        if value != 0.0:
            raise unsupported(name, f"a non-zero {name} (use repetition_penalty)")
    if _get(body, "logit_bias", dict):
        raise unsupported("logit_bias", "logit_bias")


def _sampling(body: Mapping[str, Any]) -> SamplingConfig:
    temperature = _get(body, "temperature", float, 1.0)
    _in_range("temperature", temperature, 0.0, 2.0)
    top_p = _get(body, "top_p", float, 1.0)
    _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = _get(body, "top_k", int, 0)
    if top_k < -1:
        raise invalid("top_k", f"top_k must be >= 0 (0 or -1: off), got {top_k}")
    min_p = _get(body, "min_p", float)
    _in_range("min_p", min_p, 0.0, 1.0)
    penalty = _get(body, "repetition_penalty", float, 1.0)
    _in_range("repetition_penalty", penalty, 0.0, 100.0, lo_open=True)
    seed = _get(body, "seed", int)
    if seed is not None and not 0 <= seed < 2**63:
        raise invalid("seed", f"seed must be in [0, 2**63), got {seed}")
    if temperature == 0.0:  # OpenAI: temperature 0 is (near-)deterministic; here exactly greedy
        return SamplingConfig(do_sample=False, repetition_penalty=penalty)
    return SamplingConfig(do_sample=True, temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                          min_p=min_p, repetition_penalty=penalty, seed=seed)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "stop must be a string or an array of strings", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def _token_ids(value: list[Any], ctx: ModelContext) -> list[int]:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise invalid("prompt", "a token prompt must be an array of integers", "invalid_type")
    bad = [t for t in value if not 0 <= t < ctx.vocab_size]
    if bad:
        raise invalid("prompt", f"token id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size})")
    return list(value)


def _completion_prompt(body: Mapping[str, Any], ctx: ModelContext) -> list[int]:
    """``prompt``: a string, an array of token ids, or an array holding one of either."""
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("prompt", "prompt is required", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise unsupported("prompt", f"a batch of {len(prompt)} prompts in one request (send one each)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return ctx.encode(prompt)
    if isinstance(prompt, list):
        return _token_ids(prompt, ctx)
    raise invalid("prompt", "prompt must be a string or an array of token ids", "invalid_type")


def _message_text(content: Any, i: int) -> str:
    """A message's content: a string, null, or an array of text parts joined."""
    param = f"messages[{i}].content"
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(param, f"content part {kind!r} (only text parts)")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(param, f"{param} must be a string or an array of text parts", "invalid_type")


def _chat_prompt(body: Mapping[str, Any], ctx: ModelContext) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty array of {role, content} objects",
                      "missing_required_parameter" if messages is None else "invalid_type")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object", "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                          f"got {role!r:.40}")
        clean.append({"role": role, "content": _message_text(m.get("content"), i)})
    try:
        text = ctx.chat_prompt(clean)
    except ValueError as e:
        raise invalid("messages", str(e), "chat_template_error") from None
    return ctx.encode(text)


def _max_tokens(body: Mapping[str, Any], chat: bool, prompt_len: int, ctx: ModelContext) -> int:
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    given = [(n, _get(body, n, int)) for n in names]
    given = [(n, v) for n, v in given if v is not None]
    room = None if ctx.max_positions is None else ctx.max_positions - prompt_len
    if room is not None and room < 1:
        raise invalid("messages" if chat else "prompt",
                      f"This model's maximum context length is {ctx.max_positions} tokens; the prompt has "
                      f"{prompt_len} tokens, leaving no room to generate", "context_length_exceeded")
    if not given:
        if chat:
            return room if room is not None else COMPLETION_DEFAULT_MAX_TOKENS
        return COMPLETION_DEFAULT_MAX_TOKENS if room is None else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    name, value = given[0]
    if value < 1:
        raise invalid(name, f"{name} must be >= 1, got {value}")
    if room is not None and value > room:
        raise invalid(name, f"This model's maximum context length is {ctx.max_positions} tokens. However, you "
                      f"requested {prompt_len + value} tokens ({prompt_len} in the prompt, {value} for the "
                      f"completion). Please reduce the prompt or {name}.", "context_length_exceeded")
    return value


def parse_request(body: Any, kind: str, ctx: ModelContext) -> GenerationRequest:
    """The request for ``kind`` ("completion" or "chat") from a decoded JSON body; APIError if bad."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object", "invalid_type")
    chat = kind == "chat"
    model = _get(body, "model", str)
    if model is not None and model != ctx.model_id:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{ctx.model_id}`",
                       param="model", code="model_not_found")
    _refuse_unsupported(body, chat)
    sampling = _sampling(body)
    stop = _stop(body)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict)
    if options is not None and not stream:
        raise invalid("stream_options", "stream_options is only allowed when stream is true")
    include_usage = options is not None and _get(options, "include_usage", bool, False)
    ids = _chat_prompt(body, ctx) if chat else _completion_prompt(body, ctx)
    if not ids:
        raise invalid("messages" if chat else "prompt", "the prompt encodes to no tokens")
    return GenerationRequest(kind, tuple(ids), _max_tokens(body, chat, len(ids), ctx), sampling, stop,
                             stream, include_usage)

