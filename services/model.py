"""The model deployment: one engine per replica, shared by every request it receives.

Requests arrive as plain dicts from the ingress (already validated and filled with the
server defaults); replies go back as dicts, and client mistakes that only the model side
can see (a prompt longer than the context, a logit_bias id outside the vocabulary) come
back as {"error": {...}} rather than as exceptions, so the ingress can answer 4xx before
it starts a stream.

A request has one or more prompts (a list `prompt` on /v1/completions) and `n` choices per
prompt; choice `index` = prompt number * n + j, as OpenAI numbers them. Each choice is one
engine request; with a seed, choice j samples with seed + j, so a request with n=3 and
seed s gives the replies of three requests with seeds s, s+1, s+2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import replace
from typing import AsyncIterator

import ray
from ray import serve

from zhchat.config import ServeConfig


def _error(status: int, message: str, param: str | None, code: str) -> dict:
    return {"error": {"status": status, "message": message, "param": param, "code": code}}


def _engine_failed(e: Exception) -> dict:
    return _error(503, f"the model could not generate ({e}); retry shortly", None, "engine_failed")


def _plain_logprobs(lps) -> list | None:
    """TokenLogprobs as plain lists [token, logprob, [[alt, logprob], ...]] (cheap to send)."""
    return None if lps is None else [[lp.token, lp.logprob, [list(t) for t in lp.top]] for lp in lps]


class _Choice:
    """One choice of a request: its prompt, parameters and place in the response."""

    def __init__(self, index: int, prompt: list[int], params, j: int, n: int):
        self.index, self.prompt, self.params, self.j, self.n = index, prompt, params, j, n

    def attempt(self, attempt: int = 0):
        """The params of an attempt: a blocked reply is regenerated with a new seed
        (seed + j + attempt * n: never another choice's seed)."""
        if self.params.seed is None:
            return self.params
        return replace(self.params, seed=self.params.seed + self.j + attempt * self.n)

    def attempts(self, tries: int):
        for attempt in range(tries):
            yield attempt, self.attempt(attempt)


@serve.deployment
class ChatModel:
    def __init__(self, cfg: dict):
        from zhchat.blocklist import Blocklist
        from zhchat.engine import open_engine

        self.cfg = ServeConfig.model_validate(cfg)
        if not self.cfg.model:
            raise ValueError("no model to serve: set serve.model in the config, --model, or ZHCHAT_MODEL")
        # The zhchat engine runs in a child process: this one's event loop streams every delta
        # in Python, which would hold the GIL its forward passes need (zhchat/engine/process.py);
        # vLLM runs its engine core in processes of its own. Ray gives a replica
        # OMP_NUM_THREADS=1 for fractional CPUs; the engine gets the CPUs asked for.
        self.engine = open_engine(self.cfg, child_process=True, threads=max(1, int(round(self.cfg.replica_cpus))))
        self.blocklist = Blocklist.load(self.cfg.blocklist_file)
        self._interval = self.cfg.stream_interval_ms / 1000
        self.engine.check_health()  # warm-up: the first user does not pay for lazy init

    # -- helpers ------------------------------------------------------------------------------
    def _prepare(self, req: dict) -> tuple[list[_Choice], list[int], dict | None]:
        """(choices, prompt tokens of each prompt, None) or ([], [], an error dict naming the field)."""
        from pydantic import ValidationError

        from zhchat.dialogue import Message, PromptTooLong
        from zhchat.engine import SamplingParams
        from zhchat.engine.params import error_field

        try:
            params = SamplingParams(**req["params"])
        except ValidationError as e:
            return [], [], _error(400, str(e.errors()[0]["msg"]), error_field(e), "invalid_value")
        try:
            self.engine.check_logit_bias(params)
        except ValueError as e:
            return [], [], _error(400, str(e), "logit_bias", "invalid_value")
        n = req.get("n", 1)
        texts = req["prompts"] if req["kind"] == "text" else [req["messages"]]
        choices, sizes = [], []
        for p, text in enumerate(texts):
            try:
                if req["kind"] == "chat":
                    msgs = [Message(role, content) for role, content in text]
                    prompt = self.engine.chat_prompt(msgs, params.max_tokens)
                else:
                    prompt = self.engine.text_prompt(text, params.max_tokens)
            except PromptTooLong as e:
                param = "messages" if req["kind"] == "chat" else ("prompt" if len(texts) == 1 else f"prompt[{p}]")
                return [], [], _error(400, f"{e}; send fewer tokens or lower max_tokens", param,
                                      "context_length_exceeded")
            except ValueError as e:
                return [], [], _error(400, str(e), "messages", "invalid_value")
            sizes.append(len(prompt))
            choices += [_Choice(p * n + j, prompt, params, j, n) for j in range(n)]
        return choices, sizes, None

    def _tries(self) -> int:
        return self.cfg.blocklist_retries + 1 if self.blocklist else 1

    def _blocked(self, c: _Choice, completion_tokens: int) -> dict:
        return {"index": c.index, "text": self.cfg.blocked_reply, "finish_reason": "content_filter",
                "blocked": "replaced", "prompt_tokens": len(c.prompt), "completion_tokens": completion_tokens,
                "logprobs": None}

    # -- request methods --------------------------------------------------------------------------
    # An engine failure (its child process died, non-finite logits) is the server's fault and
    # passes: health checks fail too and Serve replaces this replica. Before any text went out
    # the client gets a 503 with Retry-After, as for a dead replica; mid-stream the ingress
    # ends the stream with an in-band error.
    async def generate(self, req: dict) -> dict:
        """{"choices": [per choice: text, finish_reason, logprobs, ...], "prompt_tokens"} or an error."""
        from zhchat.engine import EngineError

        choices, sizes, err = self._prepare(req)
        if err:
            return err
        tasks = [asyncio.ensure_future(self._generate(c)) for c in choices]
        try:
            results = await asyncio.gather(*tasks)
        except EngineError as e:
            return _engine_failed(e)
        finally:  # one choice failed: the others' engine requests stop too
            for t in tasks:
                t.cancel()
        return {"choices": list(results), "prompt_tokens": sum(sizes)}

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """Deltas {"index", "text", "finish_reason", "logprobs", "prompt_tokens",
        "completion_tokens", "blocked"} of all choices as they come; the first item may be an
        error dict instead."""
        from zhchat.engine import EngineError

        choices, _, err = self._prepare(req)
        if err:
            yield err
            return
        streams = [self._stream(c) for c in choices]
        merged = streams[0] if len(streams) == 1 else _merge(streams)
        started = False
        try:
            async for item in merged:
                started = True
                yield item
        except EngineError as e:
            if started:
                raise
            yield _engine_failed(e)
        finally:
            await merged.aclose()

    async def _generate(self, c: _Choice) -> dict:
        used = 0
        for attempt, sp in c.attempts(self._tries()):
            parts, lps, last = [], [], None
            async for d in self.engine.astream(c.prompt, sp):  # consumed here: no pacing
                parts.append(d.text)
                lps += d.logprobs or []
                last = d
            used += last.completion_tokens
            text = "".join(parts)
            if not self.blocklist.match(text):
                return {"index": c.index, "text": text, "finish_reason": last.finish_reason,
                        "prompt_tokens": len(c.prompt), "completion_tokens": used,
                        "blocked": "regenerated" if attempt else None,
                        "logprobs": _plain_logprobs(lps) if sp.logprobs is not None else None}
        return self._blocked(c, used)

    async def _stream(self, c: _Choice) -> AsyncIterator[dict]:
        from zhchat.blocklist import StreamGuard

        def item(text, finish, completion_tokens, lps, blocked=None):
            return {"index": c.index, "text": text, "finish_reason": finish, "prompt_tokens": len(c.prompt),
                    "completion_tokens": completion_tokens, "logprobs": _plain_logprobs(lps), "blocked": blocked}

        if not self.blocklist:
            async for d in self.engine.astream(c.prompt, c.attempt(0), self._interval):
                yield item(d.text, d.finish_reason, d.completion_tokens, d.logprobs)
            return
        used = 0
        for attempt, sp in c.attempts(self._tries()):
            guard, sent = StreamGuard(self.blocklist), False
            # Logprobs wait with their text: (where a delta's text starts, its logprobs).
            held: list[tuple[int, list]] = []
            raw = 0
            async with contextlib.aclosing(self.engine.astream(c.prompt, sp, self._interval)) as deltas:
                async for d in deltas:
                    if d.logprobs:
                        held.append((raw, d.logprobs))
                    raw += len(d.text)
                    out, blocked = guard.feed(d.text, final=bool(d.finish_reason))
                    if blocked:
                        used += d.completion_tokens
                        break
                    ready = [lp for start, lps in held if start < guard.released or d.finish_reason for lp in lps]
                    held = [(s, lps) for s, lps in held if not (s < guard.released or d.finish_reason)]
                    if out or d.finish_reason:
                        sent = True
                        yield item(out, d.finish_reason, used + d.completion_tokens,
                                   ready if sp.logprobs is not None else None,
                                   "regenerated" if attempt and d.finish_reason else None)
                    if d.finish_reason:
                        return
            if sent:  # part of the reply is out already: end it here, flagged
                yield item("", "content_filter", used, [] if sp.logprobs is not None else None, "cut")
                return
        yield self._blocked(c, used)

    async def info(self) -> dict:
        # The engine's own info (name, shape, error, stats counters) and this replica's.
        return {**self.engine.info(), "pid": os.getpid(), "actor": ray.get_runtime_context().get_actor_name(),
                "blocklist": bool(self.blocklist)}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica. A liveness
        probe that does not queue behind user requests (EngineClient.check_alive): a replica
        busy with a full batch and a long queue must not be killed as unhealthy."""
        await asyncio.to_thread(self.engine.check_alive, self.cfg.health_check_timeout_s / 2)


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[dict]:
    """The items of several async iterators as they come; an exception in one ends all.
    Closing this closes them (their engine requests are cancelled)."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(s):
        try:
            async for x in s:
                await q.put(x)
            await q.put(done)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await q.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            x = await q.get()
            if x is done:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()
