"""Request and response shapes of the OpenAI-style API, and its error format.

Requests are validated strictly (a string where a number belongs is an error, not a
guess) and every error names the field: {"error": {"message", "type", "param", "code"}}.
Fields OpenAI defines that we do not use (user, logit_bias, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from starlette.responses import JSONResponse


class APIError(Exception):
    """A client or server error returned in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Request(BaseModel):
    # strict: JSON types must match (no "0.5" -> 0.5); unknown OpenAI fields are ignored.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported")
    # extras beyond OpenAI's schema
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    no_repeat_ngram_size: int | None = Field(None, ge=0, le=32)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop strings must be 1 to 64 characters")
        return v

    def sampling(self) -> dict:
        """The sampling fields that were given (None means: use the server default)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size, "seed": self.seed, "stop": stop,
        }

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]


class CompletionRequest(_Request):
    prompt: str


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, result: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": None, "finish_reason": result["finish_reason"]}],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }


def text_completion(rid: str, model: str, result: dict) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": result["text"], "logprobs": None,
                     "finish_reason": result["finish_reason"]}],
        "usage": usage(result["prompt_tokens"], result["completion_tokens"]),
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def text_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, u: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic validation error as a 400 that names the field."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # pydantic reports list items as numbers, union branches by type name: keep the useful part.
    parts: list[str] = []
    for p in loc:
        if p.isdigit() and parts:
            parts[-1] += f"[{p}]"
        elif p in ("str", "list[TextPart]", "list[str]", "function-after[_stop(), union[str,list[str]]]"):
            continue
        else:
            parts.append(p)
    param = ".".join(parts) or None
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}",
                        None, "invalid_json")
    if param is None:
        return APIError(400, f"request body must be a JSON object: {e.get('msg')}", None, "invalid_value")
    if e.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_field")
    got = e.get("input")
    shown = ""
    if isinstance(got, (str, int, float, bool)) or got is None:
        shown = f" (got {json.dumps(got, ensure_ascii=False)[:80]})"
    return APIError(400, f"invalid '{param}': {e.get('msg')}{shown}", param, "invalid_value")
