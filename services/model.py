"""The model deployment: one Engine per replica, shared by every request it receives.

Requests arrive as plain dicts from the ingress (already validated and filled with the
server defaults); replies go back as dicts, and client mistakes that only the model side
can see (a prompt longer than the context) come back as {"error": {...}} rather than as
exceptions, so the ingress can answer 4xx before it starts a stream.
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
    def _prepare(self, req: dict):
        """(prompt ids, SamplingParams) or an error dict naming the field."""
        from zhchat.dialogue import Message, PromptTooLong
        from zhchat.engine import SamplingParams

        try:
            params = SamplingParams(**req["params"])
        except ValueError as e:
            return None, None, _error(400, str(e), str(e).split()[0], "invalid_value")
        try:
            if req["kind"] == "chat":
                msgs = [Message(role, content) for role, content in req["messages"]]
                prompt = self.engine.chat_prompt(msgs, params.max_tokens)
            else:
                prompt = self.engine.text_prompt(req["prompt"], params.max_tokens)
        except PromptTooLong as e:
            param = "messages" if req["kind"] == "chat" else "prompt"
            return None, None, _error(400, f"{e}; send fewer tokens or lower max_tokens", param,
                                      "context_length_exceeded")
        except ValueError as e:
            return None, None, _error(400, str(e), "messages", "invalid_value")
        return prompt, params, None

    def _seeds(self, params):
        """The params of each attempt: a blocked reply is regenerated with a new seed."""
        for attempt in range(self.cfg.blocklist_retries + 1 if self.blocklist else 1):
            seed = None if params.seed is None else params.seed + attempt
            yield attempt, replace(params, seed=seed)

    def _blocked(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"text": self.cfg.blocked_reply, "finish_reason": "content_filter", "blocked": "replaced",
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}

    # -- request methods --------------------------------------------------------------------------
    # An engine failure (its child process died, non-finite logits) is the server's fault and
    # passes: health checks fail too and Serve replaces this replica. Before any text went out
    # the client gets a 503 with Retry-After, as for a dead replica; mid-stream the ingress
    # ends the stream with an in-band error.
    async def generate(self, req: dict) -> dict:
        from zhchat.engine import EngineError

        try:
            return await self._generate(req)
        except EngineError as e:
            return _engine_failed(e)

    async def stream(self, req: dict) -> AsyncIterator[dict]:
        """Deltas {"text", "finish_reason", ...}; the first item may be an error dict."""
        from zhchat.engine import EngineError

        started = False
        try:
            async for item in self._stream(req):
                started = True
                yield item
        except EngineError as e:
            if started:
                raise
            yield _engine_failed(e)

    async def _generate(self, req: dict) -> dict:
        prompt, params, err = self._prepare(req)
        if err:
            return err
        used = 0
        for attempt, sp in self._seeds(params):
            parts, last = [], None
            async for d in self.engine.astream(prompt, sp):  # consumed here: no pacing
                parts.append(d.text)
                last = d
            used += last.completion_tokens
            text = "".join(parts)
            if not self.blocklist.match(text):
                return {"text": text, "finish_reason": last.finish_reason, "prompt_tokens": len(prompt),
                        "completion_tokens": used, "blocked": "regenerated" if attempt else None}
        return self._blocked(len(prompt), used)

    async def _stream(self, req: dict) -> AsyncIterator[dict]:
        from zhchat.blocklist import StreamGuard

        prompt, params, err = self._prepare(req)
        if err:
            yield err
            return
        if not self.blocklist:
            async for d in self.engine.astream(prompt, params, self._interval):
                yield {"text": d.text, "finish_reason": d.finish_reason,
                       "prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens}
            return
        used = 0
        for attempt, sp in self._seeds(params):
            guard, sent = StreamGuard(self.blocklist), False
            async with contextlib.aclosing(self.engine.astream(prompt, sp, self._interval)) as deltas:
                async for d in deltas:
                    out, blocked = guard.feed(d.text, final=bool(d.finish_reason))
                    if blocked:
                        used += d.completion_tokens
                        break
                    if out or d.finish_reason:
                        sent = True
                        yield {"text": out, "finish_reason": d.finish_reason, "prompt_tokens": len(prompt),
                               "completion_tokens": used + d.completion_tokens,
                               "blocked": "regenerated" if attempt and d.finish_reason else None}
                    if d.finish_reason:
                        return
            if sent:  # part of the reply is out already: end it here, flagged
                yield {"text": "", "finish_reason": "content_filter", "blocked": "cut",
                       "prompt_tokens": len(prompt), "completion_tokens": used}
                return
        yield self._blocked(len(prompt), used)

    async def info(self) -> dict:
        # The engine's own info (name, shape, error, stats counters) and this replica's.
        return {**self.engine.info(), "pid": os.getpid(), "actor": ray.get_runtime_context().get_actor_name(),
                "blocklist": bool(self.blocklist)}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        await asyncio.to_thread(self.engine.check_health, self.cfg.health_check_timeout_s / 2)
