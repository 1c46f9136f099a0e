"""A ``bitsmith serve`` app run in-process (uvicorn in a thread, loopback, a free port) and the
oracle a served reply is checked against: ``CompiledModel.generate`` on the same prompt alone."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

# word-level: every piece of the rendered prompt is a word of the tiny vocabulary (as test_chat)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w4 {% elif m['role'] == 'system' %}w6 "
            "{% else %}w5 {% endif %}{{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3 {% endif %}")


def tiny_chat_artifact(root: Path, target: str = "reference") -> Path:
    """A random-init tiny Llama (words w1..w127, <eos> = 0) with TEMPLATE, compiled to ``target``."""
    import bitsmith
    from tiny_llama import save_tiny_llama
    from transformers import AutoTokenizer

    hf = save_tiny_llama(root / "hf")
    tok = AutoTokenizer.from_pretrained(hf)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(hf)
    art = root / "tiny-chat"
    bitsmith.compile(str(hf), target=target).save(str(art))
    return art


@contextlib.contextmanager
def serving(model: Any, model_id: str = "tiny-chat", **config: Any) -> Iterator[tuple[str, Any]]:
    """(base URL ``http://127.0.0.1:PORT``, the Starlette app) while a server runs in a thread."""
    import uvicorn

    from bitsmith.serve.app import ServeConfig, create_app

    app = create_app(model, ServeConfig(model_id, **config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def greedy_alone(model: Any, prompt_ids: Sequence[int], max_tokens: int,
                 stop: Sequence[str] = ()) -> tuple[str, int, str]:
    """(text, tokens generated, OpenAI finish_reason) of ``model.generate`` on this one prompt: greedy, stopping at the
    artifact's eos id, the reply decoded without special tokens and cut at the first stop string."""
    from bitsmith.runtime.text import cut_at_stop

    eos = model.lm.eos_token_id
    out = np.asarray(model.generate(np.asarray([prompt_ids], dtype=np.int64), max_new_tokens=max_tokens,
                                    eos_token_id=eos))[0, len(prompt_ids):].tolist()
    n, finish = len(out), "length"
    if eos in out:
        out, finish = out[:out.index(eos)], "stop"
    text, hit = cut_at_stop(model.tokenizer().decode(out, skip_special_tokens=True), stop)
    return text, n, "stop" if hit else finish


def encode(model: Any, text: str) -> list[int]:
    return model.tokenizer().encode(text, add_special_tokens=False).ids


class StepGate:
    """Wraps a DecodeBatch class's ``step`` so a test can hold the engine at a token boundary
    (monkeypatched onto the real class: the batch itself is unchanged), or slow every step by
    ``delay`` seconds so that timing-dependent orderings hold on a loaded machine."""

    def __init__(self, monkeypatch: Any, delay: float = 0.0) -> None:
        from bitsmith.runtime.batching import DecodeBatch
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        real = DecodeBatch.step

        def step(batch: Any, tokens: Any) -> Any:
            self.entered.set()
            assert self.open.wait(60), "a test left the step gate closed"
            time.sleep(delay)
            return real(batch, tokens)
        monkeypatch.setattr(DecodeBatch, "step", step)
