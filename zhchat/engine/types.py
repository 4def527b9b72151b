"""The values an engine hands out: reply pieces (Delta), whole replies (Completion), token
log-probabilities, and the engine's own error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..dialogue import PromptTooLong

__all__ = ["Delta", "Completion", "TokenLogprob", "EngineError", "PromptTooLong", "FINISH_STOP", "FINISH_LENGTH",
           "EngineName"]

# The engines open_engine knows (the `engine` field of ServeConfig and EvalConfig).
EngineName = Literal["zhchat", "vllm"]

FINISH_STOP = "stop"      # <|end|>, <|endoftext|>, another role token, or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length reached


@dataclass
class TokenLogprob:
    """One reply token: its text (that token decoded alone; a token holding part of a
    character decodes to U+FFFD, as vLLM's do), its log-probability under the model's raw
    distribution, and the most likely alternatives (text, logprob), best first."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """A piece of a streamed reply. The last one has finish_reason set (or error).
    `logprobs` (when asked for) covers the tokens whose text is in this delta; the last
    delta of a reply carries those not sent yet."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class EngineError(RuntimeError):
    """The model failed to generate (an exception in the forward pass, non-finite logits,
    a dead engine process)."""
