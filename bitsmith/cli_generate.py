"""``bitsmith run`` and ``bitsmith chat``: text generation from an artifact, streamed to stdout.

Sampling rule (the same for both commands): decoding is greedy unless sampling is asked for,
either with ``--do-sample`` or by giving any of ``--temperature``, ``--top-k``, ``--top-p``,
``--min-p``, ``--seed``; ``--temperature 0`` always means greedy. ``--repetition-penalty`` applies
to greedy and sampled decoding alike and does not switch sampling on. When sampling, an option
not given is off (top-k 0, top-p 1, no min-p, temperature 1): unlike ``CompiledModel.generate``,
which keeps transformers' top_k 50, the command line filters only what it is told to.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TextIO

_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "seed")


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=32, help="most tokens generated per reply (default: run 32, chat 256)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU kernel threads (tvm-llvm, lut-cpu; 0: every core; default: as compiled)")
    g = p.add_argument_group("sampling (greedy unless --do-sample or any of --temperature --top-k --top-p "
                             "--min-p --seed is given; --temperature 0 is greedy)")
    g.add_argument("--do-sample", action="store_true", help="sample (temperature 1, no filters, unless given)")
    g.add_argument("--temperature", type=float, metavar="T", help="softmax temperature; 0: greedy")
    g.add_argument("--top-k", type=int, metavar="K", help="keep the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, metavar="P", help="keep the smallest set of tokens of mass >= P")
    g.add_argument("--min-p", type=float, metavar="P", help="keep tokens at least P times as likely as the top one")
    g.add_argument("--repetition-penalty", type=float, metavar="R",
                   help="divide (multiply) positive (negative) logits of tokens already seen by R")
    g.add_argument("--seed", type=int, help="seed of the sampler: the same seed repeats a run exactly")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the reply contains TEXT; TEXT is not printed (repeatable)")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``CompiledModel.generate`` keyword arguments from the flags (see the module docstring)."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    sample = args.do_sample or any(getattr(args, f) is not None for f in _SAMPLING_FLAGS)
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature == 0:
        sample = False
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": sample,
                              "repetition_penalty": args.repetition_penalty}
    if sample:
        kwargs.update(temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p,
                      min_p=args.min_p, seed=args.seed)
    return kwargs


def _load(args: argparse.Namespace) -> Any:
    from .runtime.artifact import load_artifact
    cm = load_artifact(args.artifact, trust_native_code=args.trust_native_code, threads=args.threads)
    if not cm.is_language_model:
        raise ValueError(f"{args.artifact} holds no causal language model (module kind "
                         f"{cm.module.attr('kind')!r}); `bitsmith {args.command}` generates text only")
    return cm


def stream_reply(cm: Any, tokenizer: Any, prompt: str, kwargs: dict[str, Any], stop: list[str],
                 write: Callable[[str], Any]) -> str:
    """Generates a reply to ``prompt`` (raw text), calling ``write`` with each new piece; returns it."""
    import numpy as np

    from .runtime.text import TextStreamer

    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = cm.lm.eos_token_id if cm.lm is not None else None
    streamer = TextStreamer(lambda t: tokenizer.decode(t, skip_special_tokens=True), write, stop)
    cm.generate(np.asarray([ids], dtype=np.int64), eos_token_id=eos, stop_strings=stop or None,
                streamer=streamer, **kwargs)
    return streamer.text


def batch_replies(cm: Any, tokenizer: Any, prompts: list[str], kwargs: dict[str, Any],
                  stop: list[str]) -> list[str]:
    """Replies to several prompts (raw text) generated together as one ragged batch (prompts of
    different lengths are left-padded and masked; each row stops on its own)."""
    from .runtime.text import cut_at_stop

    ids = [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    if not all(ids):
        raise ValueError(f"prompt {[bool(i) for i in ids].index(False) + 1} encodes to no tokens")
    eos = cm.lm.eos_token_id if cm.lm is not None else None
    out = cm.generate(ids, eos_token_id=eos, stop_strings=stop or None, **kwargs)
    width = max(len(i) for i in ids)
    replies = []
    for row in out.tolist():
        new = row[width:]
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        replies.append(cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)[0])
    return replies


def _writer(out: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        out.write(text)
        out.flush()
    return write


def cmd_run(args: argparse.Namespace) -> int:
    """One --prompt streams its reply; several run as one ragged batch, each reply printed
    after a ``[i]`` line (i counts the prompts from 1)."""
    from . import cli_offload
    kwargs = generation_kwargs(args)
    offloaded = cli_offload.is_offloaded(args.artifact)
    if offloaded and cli_offload.is_worker_rank():
        return cli_offload.serve(args)
    if not offloaded:
        cli_offload.check_plain_run(args)
    cm = cli_offload.load(args) if offloaded else _load(args)
    prompts = list(args.prompt)
    if args.chat:
        prompts = [cm.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    if len(prompts) == 1:
        stream_reply(cm, cm.tokenizer(), prompts[0], kwargs, args.stop, _writer(sys.stdout))
        print(flush=True)
    else:
        for i, reply in enumerate(batch_replies(cm, cm.tokenizer(), prompts, kwargs, args.stop), 1):
            print(f"[{i}]\n{reply}", flush=True)
    if offloaded:  # on an error the launcher's own cleanup ends the workers; its message names the rank
        cli_offload.finish(cm, args)
    return 0


def _fit(cm: Any, tokenizer: Any, messages: list[dict[str, str]], max_new: int) -> str:
    """The rendered prompt; drops the oldest exchanges (never a system message) while it is too long."""
    limit = cm.module.attr("max_positions")
    while True:
        prompt = cm.apply_chat_template(messages, add_generation_prompt=True)
        n = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        if not isinstance(limit, int) or n + max_new <= limit:
            return prompt
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
        if first is None or first == len(messages) - 1:
            raise ValueError(f"the message ({n} tokens) + --max-new-tokens {max_new} exceeds the model's "
                             f"{limit} positions")
        del messages[first:first + 2]
        print("[context full: dropped the oldest exchange]", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    """Reads user lines from stdin until EOF or /exit; keeps the conversation; streams replies."""
    kwargs = generation_kwargs(args)
    cm = _load(args)
    if cm.lm is None or cm.lm.chat_template is None:
        raise ValueError(f"{args.artifact} carries no chat template (compiled from a model without one, or by "
                         "an older bitsmith); use `bitsmith run --prompt` with raw text")
    tokenizer = cm.tokenizer()
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    write = _writer(sys.stdout)
    while True:
        if interactive:
            write("> ")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = _fit(cm, tokenizer, messages, args.max_new_tokens)
        if args.show_prompt:
            print(f"[prompt]\n{prompt}\n[/prompt]", file=sys.stderr, flush=True)
        reply = stream_reply(cm, tokenizer, prompt, kwargs, args.stop, write)
        write("\n")
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


def add_generation_commands(sub: Any, add_trust_argument: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("run", help="generate text with a compiled language model (streamed to stdout)")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--prompt", required=True, action="append",
                   help="raw prompt text (no special tokens are added); repeat it to generate for several "
                        "prompts (of any lengths) in one batch")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user message in the artifact's chat template")
    add_generation_arguments(p)
    add_trust_argument(p)
    from .cli_offload import add_run_arguments
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with a compiled language model (stdin lines, /exit to end)")
    p.add_argument("artifact", metavar="DIR")
    p.add_argument("--system", metavar="TEXT", help="a system message to start the conversation with")
    p.add_argument("--show-prompt", action="store_true", help="print each rendered prompt to stderr")
    add_generation_arguments(p)
    p.set_defaults(max_new_tokens=256)
    add_trust_argument(p)
    p.set_defaults(func=cmd_chat)
