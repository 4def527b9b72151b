"""The one sampling-parameter schema: the API request, the config's generation defaults,
eval's sampling and both engines take their fields and bounds from here.

Each bound is written once, as an annotated type (`Temperature`, `TopP`, ...); the request
model (services/api.py), `GenerationDefaults` (zhchat/config/serve.py) and `EvalConfig`
(zhchat/config/eval.py) declare their fields with these types, and `SamplingParams` is
validated with the same ones, so a value one of them accepts the others accept too.

Choices (documented in the README):
- repetition_penalty is in (0, 10]: 1 is off, above 1 discourages tokens the reply has
  already used (positive logits divided, negative ones multiplied), below 1 encourages them.
  It looks at the reply only, never the prompt.
- presence/frequency penalties are OpenAI's [-2, 2]; no_repeat_ngram_size is [0, 32]
  (0: off); top_k 0 and top_p 1 are off; temperature 0 is greedy.
- logprobs: None returns none; k in 0..20 returns each reply token's log-probability and
  the k most likely alternatives, from the model's raw distribution (log_softmax of its
  logits, before penalties, logit_bias or temperature), as vLLM reports them by default.
- logit_bias: token id -> a value in [-100, 100] added to that token's logit before
  sampling (after the penalties); -100 in effect bans the token.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

MAX_STOPS = 4            # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20    # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 1024    # entries in one logit_bias map

MaxTokens = Annotated[int, Field(ge=1, description="Tokens to generate at most")]
Temperature = Annotated[float, Field(ge=0, le=2, description="0: greedy")]
TopP = Annotated[float, Field(gt=0, le=1, description="Nucleus sampling; 1: off")]
TopK = Annotated[int, Field(ge=0, description="0: off")]
RepetitionPenalty = Annotated[float, Field(
    gt=0, le=10, description="1: off; > 1 discourages tokens the reply already used, < 1 encourages them")]
PresencePenalty = Annotated[float, Field(ge=-2, le=2)]
FrequencyPenalty = Annotated[float, Field(ge=-2, le=2)]
NgramSize = Annotated[int, Field(ge=0, le=32, description="No n-gram of this size twice in a reply; 0: off")]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
Bias = Annotated[float, Field(ge=-100, le=100)]
TokenId = Annotated[int, Field(ge=0)]


def check_stop(stops: tuple[str, ...] | list[str]) -> None:
    """Raise ValueError unless the stop strings are within the limits."""
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop strings must be 1 to {MAX_STOP_CHARS} characters")


def check_logit_bias(bias: dict) -> None:
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")


@dataclass(config=ConfigDict(arbitrary_types_allowed=False))
class SamplingParams:
    """One request's sampling. Penalties and n-gram blocking look at the reply generated
    so far (not the prompt): a reply may repeat the user's words, but not itself. `n`
    (several choices) is the API's business: it sends n requests (services/model.py)."""

    max_tokens: MaxTokens = 64
    temperature: Temperature = 0.8
    top_p: TopP = 0.9
    top_k: TopK = 50
    repetition_penalty: RepetitionPenalty = 1.2
    presence_penalty: PresencePenalty = 0.0
    frequency_penalty: FrequencyPenalty = 0.0
    no_repeat_ngram_size: NgramSize = 3
    seed: Seed | None = None
    stop: tuple[str, ...] = ()
    logprobs: TopLogprobs | None = None
    logit_bias: dict[TokenId, Bias] = dataclasses.field(default_factory=dict)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        stops = (v,) if isinstance(v, str) else tuple(v or ())
        stops = tuple(s for s in stops if s)
        check_stop(stops)
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        check_logit_bias(v)
        return v

    def to_dict(self) -> dict:
        """The fields as plain values (for a Ray task's arguments, a log line)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_defaults(cls, defaults, **overrides) -> "SamplingParams":
        """Fields from a defaults section (GenerationDefaults, EvalConfig: any object with
        some of these attributes), then the overrides that are not None."""
        base = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(cls) if hasattr(defaults, f.name)}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


DEFAULTS = SamplingParams()


def error_field(e: ValidationError) -> str | None:
    """The field a SamplingParams validation error is about (for an API error's `param`)."""
    errors = e.errors()
    return str(errors[0]["loc"][0]) if errors and errors[0].get("loc") else None
