"""The OpenAI-compatible HTTP API (Starlette) over one ``Engine``.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``. Every error is OpenAI's JSON shape
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx/5xx status; the handlers only
parse, queue and relay events, so the event loop never waits on the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..runtime.batching import DecodeBatch
from ..runtime.chat_template import ChatTemplateError
from ..runtime.model import CompiledModel
from .engine import Engine, Event, Failed, Finished, Job, TextDelta
from .protocol import APIError, GenerationRequest, ModelContext, invalid, parse_request
from .responses import Reply, sse, usage

MAX_BODY_BYTES = 4 * 1024 * 1024   # a prompt beyond this cannot fit any context we serve
DISCONNECT_POLL_S = 0.25           # how often a waiting handler checks that its client is still there


@dataclass(frozen=True)
class ServeConfig:
    model_id: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    timeout: float = 600.0


class _ClientGone(Exception):
    pass


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def model_context(model: CompiledModel, model_id: str) -> ModelContext:
    tokenizer = model.tokenizer()
    vocab = model.module.function("main").result_types()[0].shape[-1]

    def chat_prompt(messages: list[dict[str, Any]]) -> str:
        try:
            return model.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise ValueError(str(e)) from None
    limit = model.module.attr("max_positions")
    return ModelContext(model_id, int(vocab), limit if isinstance(limit, int) else None,
                        lambda text: tokenizer.encode(text, add_special_tokens=False).ids, chat_prompt)


def engine_for(model: CompiledModel, config: ServeConfig) -> Engine:
    tokenizer = model.tokenizer()  # the engine thread's own instance
    eos = [] if model.lm is None or model.lm.eos_token_id is None else [model.lm.eos_token_id]
    return Engine(lambda: DecodeBatch(model, max_rows=config.max_batch),
                  lambda ids: tokenizer.decode(ids, skip_special_tokens=True), eos,
                  max_batch=config.max_batch, max_queue=config.max_queue, timeout=config.timeout)


class _EngineStream(StreamingResponse):
    """A streamed reply that cancels its job however the response ends (client gone included)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _read_json(request: Request) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError;
        # so are integers over Python's digit limit; RecursionError: absurdly deep nesting
        raise invalid(None, f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None


async def _next_event(queue: asyncio.Queue, request: Request) -> Event:
    """The job's next event; _ClientGone when the client disconnects while we wait."""
    getter = asyncio.ensure_future(queue.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                raise _ClientGone
    finally:
        getter.cancel()


def create_app(model: CompiledModel, config: ServeConfig) -> Starlette:
    """The ASGI app; its lifespan starts and stops the engine thread."""
    ctx = model_context(model, config.model_id)
    engine = engine_for(model, config)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' (see --api-key)",
                           type="invalid_request_error", code="invalid_api_key")

    def model_card() -> dict[str, Any]:
        return {"id": config.model_id, "object": "model", "created": 0, "owned_by": "bitsmith",
                "max_model_len": ctx.max_positions}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.model_id, **engine.stats()})

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_by_id(request: Request) -> Response:
        try:
            authorize(request)
            if request.path_params["model"] != config.model_id:
                raise APIError(404, f"The model `{request.path_params['model']}` does not exist", param="model",
                               code="model_not_found")
        except APIError as e:
            return error_response(e)
        return JSONResponse(model_card())

    async def generate(request: Request, kind: str) -> Response:
        try:
            authorize(request)
            # tokenizing and chat templates take CPU time: off the event loop, so streams keep flowing
            req = await run_in_threadpool(parse_request, await _read_json(request), kind, ctx)
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            job = engine.submit(req, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
        except APIError as e:
            return error_response(e)
        reply = Reply.new(kind, config.model_id)
        try:
            first = await _next_event(queue, request)
        except _ClientGone:
            engine.cancel(job)
            return Response(status_code=499)
        if isinstance(first, Failed):  # nothing sent yet: a proper error status
            return error_response(first.error)
        if req.stream:
            return _EngineStream(_stream(reply, req, first, queue), lambda: engine.cancel(job))
        return await _whole(reply, first, queue, request, job, engine)

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model_by_id, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.engine = engine
    return app


async def _whole(reply: Reply, event: Event, queue: asyncio.Queue, request: Request, job: Job,
                 engine: Engine) -> Response:
    """Collects a non-streamed reply; a client that leaves meanwhile cancels its job."""
    text = []
    try:
        while True:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                return JSONResponse(reply.body("".join(text), event.reason,
                                               usage(event.prompt_tokens, event.completion_tokens)))
            else:
                return error_response(event.error)
            event = await _next_event(queue, request)
    except _ClientGone:
        engine.cancel(job)
        return Response(status_code=499)


async def _stream(reply: Reply, req: GenerationRequest, event: Event, queue: asyncio.Queue) -> AsyncIterator[bytes]:
    """Server-sent events of one reply; a failure after the first byte is an error event."""
    if reply.kind == "chat":
        yield sse(reply.chunk("", first=True, include_usage=req.include_usage))
    while True:
        if isinstance(event, TextDelta):
            yield sse(reply.chunk(event.text, include_usage=req.include_usage))
        elif isinstance(event, Finished):
            yield sse(reply.chunk(None if reply.kind == "chat" else "", event.reason,
                                  include_usage=req.include_usage))
            if req.include_usage:
                yield sse(reply.usage_chunk(usage(event.prompt_tokens, event.completion_tokens)))
            break
        else:
            yield sse(event.error.body())
            break
        event = await queue.get()
    yield sse("[DONE]")
