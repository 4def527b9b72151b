"""Request and response shapes of the OpenAI-style API, and its error format.

Requests are validated strictly (a string where a number belongs is an error, not a
guess) and every error names the field: {"error": {"message", "type", "param", "code"}}.
Sampling fields take their bounds from the one sampling schema (zhchat/engine/params.py).

Every field a request may carry is listed here. Besides the ones zhchat implements:
- accepted and ignored, because they never change a reply: `user`, `metadata`, `store`,
  `service_tier`, `parallel_tool_calls`, `prompt_cache_key`, `safety_identifier`, and
  `stream_options.include_obfuscation`;
- accepted only at their neutral value (anything else is a 400 naming the field): `tools`,
  `functions` (absent, null or []), `tool_choice`, `function_call` (null or "none"),
  `response_format` ({"type": "text"}), `modalities` (["text"]), `audio` (null), and on
  /v1/completions `echo` (false), `suffix` (null), `best_of` (null or equal to n);
- anything else, OpenAI's or not, is a 400 that names it: a field that could change the
  reply is never silently ignored.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from starlette.responses import JSONResponse

from zhchat.engine import params as sp


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


# OpenAI fields zhchat does not implement, with why (the 400's message); other unknown
# fields get "unknown field".
UNSUPPORTED = {
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "zhchat models do not reason in separate tokens",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
}
MAX_N = 128  # the schema's bound; the server's own is serve.max_choices


class _Strict(BaseModel):
    # strict: JSON types must match (no "0.5" -> 0.5); forbid: a field we do not know is a
    # 400 naming it (see the module docstring for the fields accepted and ignored).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    include_obfuscation: StrictBool | None = None  # ignored: zhchat sends no obfuscation padding


def _neutral(name: str, value, ok: bool, why: str):
    if not ok:
        raise ValueError(f"unsupported:{name}:'{name}' {why}")
    return value


class _Request(_Strict):
    model: str | None = None
    temperature: sp.Temperature | None = None
    top_p: sp.TopP | None = None
    max_tokens: sp.MaxTokens | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: sp.Seed | None = None
    presence_penalty: sp.PresencePenalty | None = None
    frequency_penalty: sp.FrequencyPenalty | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    # extras beyond OpenAI's schema
    top_k: sp.TopK | None = None
    repetition_penalty: sp.RepetitionPenalty | None = None
    no_repeat_ngram_size: sp.NgramSize | None = None
    # accepted and ignored: they never change a reply
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        # Known OpenAI fields we refuse get their reason; pydantic reports the rest as extra.
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if data.get(name) is not None:
                    raise ValueError(f"unsupported:{name}:'{name}' is not supported: {why}")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        sp.check_stop([v] if isinstance(v, str) else (v or []))
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if not v:
            return v
        sp.check_logit_bias(v)
        for key, bias in v.items():
            if not re.fullmatch(r"\d{1,9}", key):
                raise ValueError(f"keys must be token ids as strings (\"1234\"), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must be in [-100, 100], got {bias} for token {key}")
        return v

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        """SamplingParams.logprobs: None (no logprobs) or the alternatives per token."""
        return None

    def sampling(self) -> dict:
        """The sampling fields that were given (None means: use the server default)."""
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return {
            "max_tokens": self.effective_max_tokens(), "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size, "seed": self.seed, "stop": stop,
            "logprobs": self.top_logprobs_asked(),
            "logit_bias": {int(k): float(v) for k, v in (self.logit_bias or {}).items()} or None,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted and ignored (the dialogue format has no speaker names)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: sp.MaxTokens | None = None  # OpenAI's newer name for max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: sp.TopLogprobs | None = None
    # accepted only at their neutral value
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None  # ignored: there are no tools
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v, info):
        return _neutral(info.field_name, v, not v, "are not supported: zhchat models do not call tools")

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v, info):
        return _neutral(info.field_name, v, v in (None, "none"), "must be \"none\": zhchat models do not call tools")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        return _neutral("response_format", v, v is None or v == {"type": "text"},
                        "must be {\"type\": \"text\"}: zhchat does not constrain replies to JSON or a schema")

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, v):
        return _neutral("modalities", v, v is None or v == ["text"], "must be [\"text\"]: zhchat replies in text only")

    @field_validator("audio")
    @classmethod
    def _no_audio(cls, v):
        return _neutral("audio", v, v is None, "is not supported: zhchat replies in text only")

    @model_validator(mode="after")
    def _aliases(self):
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("conflict:max_completion_tokens:max_tokens and max_completion_tokens are the same "
                             f"setting, and they differ ({self.max_tokens} and {self.max_completion_tokens})")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("conflict:top_logprobs:'top_logprobs' needs 'logprobs': true")
        return self

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: sp.TopLogprobs | None = None
    echo: StrictBool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("is an empty list; send a string or a list of strings")
        if isinstance(v, list) and any(isinstance(x, (int, list)) for x in v):
            raise ValueError("unsupported:prompt:'prompt' as token ids is not supported; send text")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        return _neutral("echo", v, not v, "is not supported: the reply does not repeat the prompt")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        return _neutral("suffix", v, v is None, "is not supported: zhchat does not fill in the middle")

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"unsupported:best_of:'best_of' other than n is not supported (got {self.best_of}, n={self.n})")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


# -- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(lps: list | None) -> dict | None:
    """OpenAI's chat shape from the model's [token, logprob, [[alt, logprob], ...]] lists."""
    if lps is None:
        return None
    return {"content": [{"token": t, "logprob": lp, "bytes": _bytes(t),
                         "top_logprobs": [{"token": a, "logprob": alp, "bytes": _bytes(a)} for a, alp in top]}
                        for t, lp, top in lps], "refusal": None}


def text_logprobs(lps: list | None, offset: int = 0) -> dict | None:
    """The legacy completions shape; text_offset counts token texts from `offset`, as
    vLLM's server does (a token holding part of a character counts its U+FFFD)."""
    if lps is None:
        return None
    offsets = []
    for t, _, _ in lps:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": [t for t, _, _ in lps], "token_logprobs": [lp for _, lp, _ in lps],
            "top_logprobs": [{a: alp for a, alp in top} for _, _, top in lps], "text_offset": offsets}


def chat_completion(rid: str, model: str, choices: list[dict], u: dict) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": chat_logprobs(c.get("logprobs")), "finish_reason": c["finish_reason"]}
                    for i, c in enumerate(choices)],
        "usage": u,
    }


def text_completion(rid: str, model: str, choices: list[dict], u: dict) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c["text"], "logprobs": text_logprobs(c.get("logprobs")),
                     "finish_reason": c["finish_reason"]} for i, c in enumerate(choices)],
        "usage": u,
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def text_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, u: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


# -- validation errors -------------------------------------------------------------------------

_UNION_BRANCHES = ("str", "list[TextPart]", "list[str]", "dict[str,any]", "function-after[_stop(), union[str,list[str]]]")


def _param(loc) -> str | None:
    """A pydantic location as the API names fields: messages[0].content."""
    parts: list[str] = []
    for p in (str(p) for p in loc if p != "body"):
        if p.isdigit() and parts:
            parts[-1] += f"[{p}]"
        elif p in _UNION_BRANCHES or p.startswith(("function-", "constrained-")):
            continue  # pydantic names union branches and validators: not fields
        else:
            parts.append(p)
    return ".".join(parts) or None


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic validation error as a 400 that names the field. A union (content:
    a string or parts) fails in each branch: the deepest error of that field says most."""
    e = errors[0]
    same = [x for x in errors if x.get("loc", ())[:1] == e.get("loc", ())[:1]]
    e = max(same, key=lambda x: len(x.get("loc", ())))  # max keeps the first of equals
    param = _param(e.get("loc", ()))
    msg = str(e.get("msg", ""))
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', msg)}",
                        None, "invalid_json")
    # Our validators' tagged messages: "unsupported:FIELD:why", "conflict:FIELD:why".
    m = re.search(r"(unsupported|conflict):(\w+):(.*)", msg)
    if m:
        kind, field, text = m.groups()
        return APIError(400, text, field, "unsupported_field" if kind == "unsupported" else "invalid_value")
    if param is None:
        return APIError(400, f"request body must be a JSON object: {msg}", None, "invalid_value")
    if e.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field '{param}': zhchat does not support it, and ignores no field that "
                        "could change the reply", param, "unsupported_field")
    if e.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param, "missing_field")
    got = e.get("input")
    shown = ""
    if isinstance(got, (str, int, float, bool)) or got is None:
        shown = f" (got {json.dumps(got, ensure_ascii=False)[:80]})"
    msg = msg.removeprefix("Value error, ")
    return APIError(400, f"invalid '{param}': {msg}{shown}", param, "invalid_value")
