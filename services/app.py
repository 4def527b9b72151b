"""The Serve application: a FastAPI ingress in front of the model deployment.

    serve run services.app:app                         # config from ZHCHAT_CONFIG / ZHCHAT_MODEL
    serve run services.app:build_app model=/path/ckpt  # builder with arguments
    serve deploy deploy/serve.yaml                     # import_path: services.app:build_app
    zhchat serve --model DIR                           # services.launch, same build_app

The request path is HTTP proxy -> ChatIngress -> ChatModel (a handle call that streams
chunks as they are generated). The ingress does everything that needs no model: auth,
limits, validation, defaults, the OpenAI shapes, SSE and the web page; so a bad request
is answered without touching a model replica, and model replicas scale on their own.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the
# route parameters through Serve's class-based ingress wrapper.

import hmac
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse

from services import api
from services.api import APIError, ChatCompletionRequest, CompletionRequest
from services.model import ChatModel
from zhchat.config import ServeConfig, is_uri, load_config

WEB_PAGE = Path(__file__).parent / "web" / "index.html"

web = FastAPI(title="zhchat", description="OpenAI-style chat API for a zhchat model")


@web.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError):
    return api.validation_error(exc.errors()).response()


@web.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return exc.response()


def load_api_keys(path: str | None) -> set[str]:
    keys = {k.strip() for k in os.environ.get("ZHCHAT_API_KEYS", "").split(",") if k.strip()}
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"API key file not found: {path}")
        keys |= {line.strip() for line in p.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")}
    return keys


@serve.deployment
@serve.ingress(web)
class ChatIngress:
    def __init__(self, model: DeploymentHandle, cfg: dict):
        self.model = model
        self.cfg = ServeConfig.model_validate(cfg)
        self.keys = load_api_keys(self.cfg.api_keys_file)
        self.counts: Counter[str] = Counter()

    def authorized(self, header: str) -> bool:
        if not self.keys:
            return True
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        return any(hmac.compare_digest(token, k) for k in self.keys)

    # -- request checks that need no model ---------------------------------------------------------
    def _check_access(self, request: Request) -> None:
        if not self.authorized(request.headers.get("authorization", "")):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           None, "invalid_api_key", type="authentication_error")

    async def _read(self, request: Request, schema):
        """Key, then size, then JSON, then schema: an unauthorised request is never parsed."""
        self._check_access(request)
        limit = self.cfg.max_request_bytes
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            raise APIError(413, f"request body is {size} bytes; the limit is {limit}", None, "request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {limit}", None, "request_too_large")
        try:
            return schema.model_validate_json(raw)
        except ValidationError as e:
            raise api.validation_error(e.errors()) from None

    def _params(self, body: api._Request) -> dict:
        g = self.cfg.generation
        given = body.sampling()
        asked = given["max_tokens"]
        if asked is not None and asked > g.max_tokens_cap:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
            raise APIError(400, f"{name} is {asked}; this server allows at most {g.max_tokens_cap}", name,
                           "max_tokens_too_large")
        defaults = g.model_dump(exclude={"max_tokens_cap"})  # the sampling schema's fields
        return {**defaults, **{k: v for k, v in given.items() if v is not None}}

    def _choices(self, n: int, prompts: int) -> None:
        limit = self.cfg.max_choices
        if n > limit:
            raise APIError(400, f"n is {n}; this server gives at most {limit} choices per request", "n",
                           "too_many_choices")
        if n * prompts > limit:
            raise APIError(400, f"{prompts} prompts with n={n} make {n * prompts} choices; this server gives at "
                           f"most {limit} per request", "prompt", "too_many_choices")

    def _messages(self, body: ChatCompletionRequest) -> list[tuple[str, str]]:
        msgs = body.messages
        if not msgs:
            raise APIError(400, "messages is empty; send at least one user message", "messages", "invalid_value")
        if len(msgs) > self.cfg.max_messages:
            raise APIError(400, f"{len(msgs)} messages; the limit is {self.cfg.max_messages}", "messages",
                           "too_many_messages")
        out = []
        for i, m in enumerate(msgs):
            text = m.text()
            if len(text) > self.cfg.max_message_chars:
                raise APIError(400, f"messages[{i}].content is {len(text)} characters; the limit is "
                               f"{self.cfg.max_message_chars}", f"messages[{i}].content", "message_too_long")
            out.append(("system" if m.role == "developer" else m.role, text))
        if out[-1][0] != "user":
            raise APIError(400, f"the last message must have role 'user', not '{out[-1][0]}'",
                           f"messages[{len(out) - 1}].role", "invalid_value")
        if not out[-1][1].strip():
            raise APIError(400, "the last user message is empty", f"messages[{len(out) - 1}].content",
                           "invalid_value")
        return out

    def _count(self, item: dict) -> None:
        if item.get("blocked"):
            self.counts[f"blocked_{item['blocked']}"] += 1

    # -- model calls ----------------------------------------------------------------------------
    async def _first(self, awaitable):
        """Await the model, turning overload into 503 + Retry-After and errors into APIError."""
        try:
            item = await awaitable
        except BackPressureError:
            self.counts["rejected_busy"] += 1
            raise self._retry_later("the server is busy; retry shortly", "overloaded") from None
        except DeploymentUnavailableError:
            raise self._retry_later("the model is not available yet; retry shortly", "unavailable") from None
        except RayActorError:  # the replica died (it is being replaced): the client may retry
            self.counts["replica_failures"] += 1
            raise self._retry_later("the model replica failed; retry shortly", "replica_failed") from None
        except StopAsyncIteration:
            raise APIError(500, "the model returned nothing", None, "empty_response") from None
        if "error" in item:
            e = item["error"]
            if e["status"] == 503:  # the model side's own "retry later" (its engine failed)
                raise self._retry_later(e["message"], e["code"])
            raise APIError(e["status"], e["message"], e["param"], e["code"])
        return item

    def _retry_later(self, message: str, code: str) -> APIError:
        return APIError(503, message, None, code, headers={"Retry-After": str(self.cfg.retry_after_s)})

    async def _complete(self, req: dict, body: api._Request, chat: bool):
        self.counts["requests"] += 1
        rid, model = api.new_id("chatcmpl" if chat else "cmpl"), self.cfg.model_name
        if not body.stream:
            result = await self._first(self.model.generate.remote(req))
            for c in result["choices"]:
                self._count(c)
            u = api.usage(result["prompt_tokens"], sum(c["completion_tokens"] for c in result["choices"]))
            return (api.chat_completion if chat else api.text_completion)(rid, model, result["choices"], u)
        gen = self.model.options(stream=True).stream.remote(req)
        first = await self._first(gen.__anext__())
        count = req["n"] * (1 if chat else len(req["prompts"]))
        return StreamingResponse(self._sse(rid, model, first, gen, req["n"], count, body.include_usage, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, rid: str, model: str, first: dict, gen, n: int, count: int, include_usage: bool,
                   chat: bool) -> AsyncIterator[str]:
        """The SSE events of `count` choices whose deltas arrive interleaved (each has its
        `index`); the usage chunk and [DONE] follow the last choice's end."""
        created = int(time.time())
        if chat:
            for i in range(count):
                yield api.sse(api.chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}, None))
        open_choices = set(range(count))
        prompt_tokens: dict[int, int] = {}
        completion_tokens: dict[int, int] = {}
        offsets = [0] * count  # legacy logprobs' text_offset, per choice
        item: dict[str, Any] | None = first
        try:
            while item is not None:
                self._count(item)
                i, text, finish, lps = item["index"], item["text"], item["finish_reason"], item.get("logprobs")
                prompt_tokens[i], completion_tokens[i] = item["prompt_tokens"], item["completion_tokens"]
                if text or lps:
                    if chat:
                        yield api.sse(api.chat_chunk(rid, model, created, i, {"content": text}, None,
                                                     api.chat_logprobs(lps)))
                    else:
                        yield api.sse(api.text_chunk(rid, model, created, i, text, None,
                                                     api.text_logprobs(lps, offsets[i])))
                        offsets[i] += sum(len(t) for t, _, _ in lps or ())
                if finish:
                    yield api.sse(api.chat_chunk(rid, model, created, i, {}, finish) if chat
                                  else api.text_chunk(rid, model, created, i, "", finish))
                    open_choices.discard(i)
                    if not open_choices:
                        break
                item = await gen.__anext__()
            if include_usage:
                # A prompt is counted once, however many choices it has (index = prompt * n + j).
                u = api.usage(sum(t for i, t in prompt_tokens.items() if i % n == 0), sum(completion_tokens.values()))
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield api.sse(api.usage_chunk(rid, model, created, obj, u))
        except Exception as e:  # the replica died mid-stream: tell the client in-band
            self.counts["stream_errors"] += 1
            yield api.sse(APIError(500, f"generation failed: {type(e).__name__}", None, "generation_failed").body())
        yield api.sse("[DONE]")

    # -- routes -----------------------------------------------------------------------------------
    @web.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._read(request, ChatCompletionRequest)
        self._choices(body.n, 1)
        req = {"kind": "chat", "messages": self._messages(body), "params": self._params(body), "n": body.n}
        return await self._complete(req, body, chat=True)

    @web.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._read(request, CompletionRequest)
        prompts = body.prompts()
        self._choices(body.n, len(prompts))
        for i, p in enumerate(prompts):
            if len(p) > self.cfg.max_message_chars:
                param = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
                raise APIError(400, f"{param} is {len(p)} characters; the limit is {self.cfg.max_message_chars}",
                               param, "message_too_long")
        req = {"kind": "text", "prompts": prompts, "params": self._params(body), "n": body.n}
        return await self._complete(req, body, chat=False)

    @web.get("/v1/models")
    async def models(self, request: Request):
        self._check_access(request)
        return {"object": "list", "data": [{
            "id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "zhchat",
            "metadata": {"counts": dict(self.counts), "max_tokens_cap": self.cfg.generation.max_tokens_cap},
        }]}

    @web.get("/metrics")
    async def metrics(self, request: Request):
        """Ingress counters (requests, blocked replies, 503s) and one model replica's stats."""
        self._check_access(request)
        info = await self.model.info.remote()
        return {"ingress": dict(self.counts), "model_replica": info}

    @web.get("/healthz")
    async def healthz(self):
        try:
            info = await self.model.info.remote()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "reason": type(e).__name__}, status_code=503)
        return {"status": "ok", "context_length": info["context_length"]}

    @web.get("/")
    async def page(self):
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))


# -- wiring ------------------------------------------------------------------------------------------


def _replica_gpus(setting) -> float:
    if setting != "auto":
        return float(setting)
    try:
        import ray

        if ray.is_initialized():
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except Exception:
        return 0.0


def _abs(path: str | None) -> str | None:
    """Replicas run in another working directory: pass them absolute paths."""
    return path if not path or is_uri(path) else os.path.abspath(os.path.expanduser(path))


def app_from_config(cfg: ServeConfig):
    """The bound application (ingress -> model) for one ServeConfig."""
    cfg = cfg.model_copy(update={"model": _abs(cfg.model), "api_keys_file": _abs(cfg.api_keys_file),
                                 "blocklist_file": _abs(cfg.blocklist_file)})
    plain = cfg.model_dump()
    model = ChatModel.options(
        autoscaling_config={
            "min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
            "initial_replicas": cfg.initial_replicas, "target_ongoing_requests": cfg.target_ongoing_requests,
            "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": _replica_gpus(cfg.replica_gpus)},
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
    ).bind(plain)
    # Keys given to the driver in ZHCHAT_API_KEYS reach the ingress replica through its env.
    env = {"ZHCHAT_API_KEYS": os.environ["ZHCHAT_API_KEYS"]} if os.environ.get("ZHCHAT_API_KEYS") else {}
    opts: dict[str, Any] = {"num_cpus": cfg.ingress_cpus}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return ChatIngress.options(
        # The ingress only forwards; the queue bound that matters is the model handle's, where
        # overload becomes 503 + Retry-After. The proxy's own 503 (this bound) has no Retry-After.
        num_replicas=1, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        max_queued_requests=4 * cfg.ingress_max_ongoing_requests, ray_actor_options=opts,
    ).bind(model, plain)


def build_app(args: dict[str, Any]):
    """Application builder for `serve run/build/deploy`: args are `config` (a zhchat YAML,
    default ZHCHAT_CONFIG), `model` (default ZHCHAT_MODEL) and any other `serve` section key."""
    args = dict(args or {})
    config = args.pop("config", None) or os.environ.get("ZHCHAT_CONFIG")
    args.setdefault("model", os.environ.get("ZHCHAT_MODEL"))
    args = {k: v for k, v in args.items() if v is not None}
    cfg = load_config(config, {"serve": args}).resolved().serve
    return app_from_config(cfg)


app = build_app({})
