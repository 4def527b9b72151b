"""`zhchat chat`: talk to a model in the terminal, with history, replies streamed.

Commands: /reset clears the history, /quit (or Ctrl-D) leaves. Uses the same engine as
the server and evaluation, so what you see here is what the API answers.
"""

from __future__ import annotations

import sys

from .config import RunConfig
from .dialogue import Message, PromptTooLong
from .report import say


def run_chat(cfg: RunConfig, args=None) -> dict:
    from .engine import SamplingParams, open_engine

    if not cfg.serve.model:
        raise ValueError("no model: pass --model DIR (a checkpoint or run folder)")
    engine = open_engine(cfg.serve)  # serve.engine: the same engine the server runs
    params = SamplingParams.from_defaults(cfg.serve.generation)
    say(f"model {cfg.serve.model} (context {engine.context_length} tokens); /reset clears, /quit leaves")
    history: list[Message] = []
    turns = 0
    while True:
        try:
            text = input("你: ").strip()
        except EOFError:
            print(file=sys.stderr)
            break
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            history.clear()
            say("(history cleared)")
            continue
        history.append(Message("user", text))
        try:
            prompt = engine.chat_prompt(history, params.max_tokens)
        except PromptTooLong as e:
            say(f"[red]{e}[/red]")
            history.pop()
            continue
        print("机器人: ", end="", flush=True)
        parts = []
        for delta in engine.stream(prompt, params):
            print(delta.text, end="", flush=True)
            parts.append(delta.text)
        print(flush=True)
        history.append(Message("assistant", "".join(parts)))
        turns += 1
    engine.close()
    return {"turns": turns}
