"""`bitsmith serve` end to end on loopback: the official `openai` client unchanged, replies equal
to `CompiledModel.generate` of the same prompt alone (the oracle), continuous batching of
concurrent requests, 429 on a full queue, OpenAI-shaped 4xx errors, disconnects and timeouts
freeing their slot. The model is a random-init tiny Llama compiled to the reference target."""

from __future__ import annotations

import concurrent.futures as futures
import json
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import StepGate, encode, greedy_alone, serving, tiny_chat_artifact  # noqa: E402

PROMPTS = ["w5 w9 w17", "w33", "w100 w101 w7 w8 w9 w10 w11", "w60 w61", "w12 w13 w14 w15", "w99",
           "w3 w3 w3", "w71 w72 w73 w74 w75 w76 w77 w78 w79 w80"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import bitsmith
    return bitsmith.load(str(tiny_chat_artifact(tmp_path_factory.mktemp("serve"))))


@pytest.fixture(scope="module")
def server(model):
    with serving(model, max_batch=4, max_queue=32) as (url, app):
        yield url, app


def client(url: str, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny-chat"]
    assert client(url).models.retrieve("tiny-chat").id == "tiny-chat"
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 4
    assert health["kv_cache"] == "concat"  # the reference target has no in-place variant


def test_completion_greedy_equals_generate(server, model):
    url, _ = server
    ids = encode(model, PROMPTS[0])
    want, n, finish = greedy_alone(model, ids, 12)
    r = client(url).completions.create(model="tiny-chat", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    # a prompt given as token ids is the same request
    r2 = client(url).completions.create(model="tiny-chat", prompt=ids, max_tokens=12, temperature=0)
    assert r2.choices[0].text == want


def test_chat_and_streaming_with_the_openai_client(server, model):
    url, _ = server
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"}]
    ids = encode(model, model.apply_chat_template(messages))
    want, n, finish = greedy_alone(model, ids, 10)
    c = client(url)
    r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)

    chunks = list(c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == finish
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n

    pieces = list(c.completions.create(model="tiny-chat", prompt=PROMPTS[2], max_tokens=9, temperature=0,
                                       stream=True))
    assert "".join(p.choices[0].text for p in pieces) == greedy_alone(model, encode(model, PROMPTS[2]), 9)[0]


def test_sse_wire_format_ends_with_done(server):
    url, _ = server
    body = {"model": "tiny-chat", "prompt": "w5", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_stop_strings_cut_the_reply(server, model):
    url, _ = server
    ids = encode(model, PROMPTS[3])
    full = greedy_alone(model, ids, 8)[0]
    words = full.split()
    if len(words) < 3:
        pytest.skip("the random model ends this reply too early to place a stop string")
    stop = " " + words[2]
    want = full[:full.find(stop)]
    r = client(url).completions.create(model="tiny-chat", prompt=PROMPTS[3], max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"


def test_concurrent_requests_equal_each_alone(server, model):
    """8 requests at once through 4 batch slots: greedy ones equal generate alone, seeded sampled
    ones equal the same seed sent alone, and steps really carried several rows."""
    _concurrent_requests_equal_each_alone(*server, model)


def test_served_in_place_on_tvm_llvm(tmp_path_factory):
    """The same on tvm-llvm, whose DecodeBatch writes its KV caches in place (runtime/batch_caches.py):
    /health says so, and the replies still equal generate alone."""
    import bitsmith
    model = bitsmith.load(str(tiny_chat_artifact(tmp_path_factory.mktemp("serve-llvm"), "tvm-llvm")))
    with serving(model, max_batch=4, max_queue=32) as (url, app):
        assert httpx.get(url + "/health").json()["kv_cache"] == "in place"
        _concurrent_requests_equal_each_alone(url, app, model)


def _concurrent_requests_equal_each_alone(url, app, model):
    c = client(url)
    lengths = [5, 17, 9, 23, 2, 14, 11, 30]
    alone = [greedy_alone(model, encode(model, p), n)[0] for p, n in zip(PROMPTS, lengths)]

    def greedy(i):
        return c.completions.create(model="tiny-chat", prompt=PROMPTS[i], max_tokens=lengths[i],
                                    temperature=0).choices[0].text

    def sampled(i):
        return c.completions.create(model="tiny-chat", prompt=PROMPTS[i], max_tokens=12, temperature=0.9,
                                    top_p=0.95, seed=1000 + i).choices[0].text

    sampled_alone = [sampled(i) for i in range(4)]
    with futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(greedy, range(8)))
        got_sampled = list(pool.map(sampled, range(4)))
    assert got == alone
    assert got_sampled == sampled_alone
    assert app.state.engine.max_rows_seen > 1
    assert app.state.engine.max_rows_seen <= 4


def test_a_request_joins_a_running_batch_and_leaves_when_done(server, model, monkeypatch):
    """Continuous batching: a short request sent while a long one decodes is admitted at a token
    boundary and finishes while the long one is still running; both equal their runs alone.
    Every step is slowed by 10 ms so the long one (200 steps) surely outlasts the short one."""
    url, app = server
    engine = app.state.engine
    long_want, n, _ = greedy_alone(model, encode(model, "w5"), 200)
    assert n == 200  # precondition: alone it runs every step
    StepGate(monkeypatch, delay=0.01)
    c = client(url)
    stream = c.completions.create(model="tiny-chat", prompt="w5", max_tokens=200, temperature=0, stream=True)
    chunks = iter(stream)
    pieces = [next(chunks).choices[0].text]
    short = c.completions.create(model="tiny-chat", prompt=PROMPTS[2], max_tokens=3, temperature=0)
    assert engine.stats()["active"] == 1                     # the long one is still decoding
    assert short.choices[0].text == greedy_alone(model, encode(model, PROMPTS[2]), 3)[0]
    pieces += [p.choices[0].text for p in chunks]
    assert "".join(pieces) == long_want


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "max_tokens": "12"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "w5", "temperature": True}, 400, "temperature"),
    ("/v1/completions", {"prompt": "w5", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "w5", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "w5", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "w5", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "w5", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "w5", "seed": -3}, 400, "seed"),
    ("/v1/completions", {"prompt": [500]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "w5 " * 300}, 400, "prompt"),      # longer than 256 positions
    ("/v1/completions", {"prompt": "w5", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "w5", "stream": False, "stream_options": {}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w5"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function"}]},
     400, "tools"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_server_keeps_serving_after_errors_and_ignores_unknown_fields(server, model):
    url, _ = server
    for path in ("/nope", "/v1/completions"):
        r = httpx.get(url + path)
        assert r.status_code in (404, 405) and "error" in r.json()
    body = {"model": "tiny-chat", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0,
            "some_future_field": {"x": 1}, "user": "me"}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy_alone(model, encode(model, PROMPTS[1]), 6)[0]


def test_api_key(model):
    with serving(model, api_key="sekret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        r = httpx.post(url + "/v1/completions", json={"prompt": "w5", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client(url, api_key="sekret").completions.create(model="tiny-chat", prompt="w5", max_tokens=2)
        assert httpx.get(url + "/health").status_code == 200   # health needs no key


def _wait_for(predicate, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_failing_model_fails_its_requests_and_the_server_goes_on(model, monkeypatch):
    from bitsmith.runtime.batching import DecodeBatch
    real = DecodeBatch.step
    calls = []

    def broken(batch, tokens):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("kernel exploded")
        return real(batch, tokens)
    monkeypatch.setattr(DecodeBatch, "step", broken)
    with serving(model) as (url, _):
        body = {"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and "kernel exploded" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == greedy_alone(model, encode(model, PROMPTS[0]), 5)[0]


def test_full_queue_gets_429_and_the_rest_complete(model, monkeypatch):
    gate = StepGate(monkeypatch)
    gate.open.clear()
    with serving(model, max_batch=1, max_queue=1) as (url, app):
        engine = app.state.engine
        c = client(url)
        with futures.ThreadPoolExecutor(2) as pool:
            body = dict(model="tiny-chat", max_tokens=4, temperature=0)
            first = pool.submit(c.completions.create, prompt=PROMPTS[0], **body)
            assert gate.entered.wait(20)                       # the first holds the only batch slot
            second = pool.submit(c.completions.create, prompt=PROMPTS[1], **body)
            assert _wait_for(lambda: engine.stats()["waiting"] == 1)
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(prompt=PROMPTS[2], **body)
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            gate.open.set()
            assert first.result(30).choices[0].text == greedy_alone(model, encode(model, PROMPTS[0]), 4)[0]
            assert second.result(30).choices[0].text == greedy_alone(model, encode(model, PROMPTS[1]), 4)[0]


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_slot(model, monkeypatch, stream):
    """A client that leaves mid-request: its row is released at the next token boundary, long
    before max_tokens, and the next request is served."""
    gate = StepGate(monkeypatch)
    with serving(model, max_batch=1, max_queue=4) as (url, app):
        engine = app.state.engine
        body = {"model": "tiny-chat", "prompt": "w5", "max_tokens": 200, "temperature": 0, "stream": stream}
        assert greedy_alone(model, encode(model, "w5"), 200)[1] == 200  # alone it runs all 200 steps
        gate.open.clear()
        with httpx.Client(timeout=30) as h:
            if stream:
                with h.stream("POST", url + "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())                      # the first token arrived
            else:
                with pytest.raises(httpx.ReadTimeout):
                    h.post(url + "/v1/completions", json=body, timeout=1.0)
        assert _wait_for(lambda: engine.cancels == 1)        # the server noticed while the step was held
        steps = engine.steps
        gate.open.set()
        assert _wait_for(lambda: engine.stats()["active"] == 0)
        assert engine.steps - steps < 50                       # freed long before 200 tokens
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_timeout_is_a_504(model, monkeypatch):
    gate = StepGate(monkeypatch)
    with serving(model, max_batch=1, timeout=0.5) as (url, _):
        gate.open.clear()
        with futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/v1/chat/completions", timeout=30,
                                  json={"messages": [{"role": "user", "content": "w5"}], "max_tokens": 50})
            assert gate.entered.wait(20)
            time.sleep(0.7)
            gate.open.set()
            r = pending.result(30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_cli_serve_flags_and_default_model_id(model, tmp_path, capsys):
    """`bitsmith serve` refuses bad flags with exit 2; started for real (a subprocess), it serves
    the artifact under its directory's name on loopback."""
    import os
    import socket
    import subprocess
    import sys

    from test_cli import run_cli
    art = tmp_path / "my-model"
    model.save(str(art))
    for flags, word in ((["--max-batch", "0"], "--max-batch"), (["--timeout", "0"], "--timeout")):
        code, _, err = run_cli(capsys, "serve", str(art), *flags)
        assert code == 2 and word in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith", "serve", str(art), "--port", str(port)], cwd=root,
                            env={**os.environ, "PYTHONPATH": root}, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: proc.poll() is not None or _up(url), 60), "the server did not start"
        assert proc.poll() is None, proc.stderr.read()
        assert [m.id for m in client(url).models.list().data] == ["my-model"]
        r = client(url).completions.create(model="my-model", prompt=PROMPTS[1], max_tokens=4, temperature=0)
        assert r.choices[0].text == greedy_alone(model, encode(model, PROMPTS[1]), 4)[0]
    finally:
        proc.terminate()
        proc.wait(30)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
