"""``bitsmith serve``: an OpenAI-compatible HTTP server with continuous batching (docs/serving.md).

Needs the ``serve`` extra (starlette, uvicorn); the runtime itself does not."""
