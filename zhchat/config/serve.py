"""Config for the chat service (services/) and the terminal chat."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..engine import params as sp
from ..engine.types import EngineName
from .base import Section


class GenerationDefaults(Section):
    """Sampling used when a request does not say; also the terminal chat's settings.
    Fields, bounds and defaults are the sampling schema's (zhchat/engine/params.py)."""

    max_tokens: sp.MaxTokens = sp.DEFAULTS.max_tokens
    max_tokens_cap: int = Field(512, ge=1, description="Requests asking for more get a 400 naming max_tokens")
    temperature: sp.Temperature = sp.DEFAULTS.temperature
    top_p: sp.TopP = sp.DEFAULTS.top_p
    top_k: sp.TopK = sp.DEFAULTS.top_k
    repetition_penalty: sp.RepetitionPenalty = sp.DEFAULTS.repetition_penalty
    presence_penalty: sp.PresencePenalty = sp.DEFAULTS.presence_penalty
    frequency_penalty: sp.FrequencyPenalty = sp.DEFAULTS.frequency_penalty
    no_repeat_ngram_size: sp.NgramSize = sp.DEFAULTS.no_repeat_ngram_size


class ServeConfig(Section):
    model: str | None = Field(None, description="Checkpoint folder, run folder or cloud URI")
    engine: EngineName = Field("zhchat", description="zhchat: small models, laptops, tests; vllm: real models (the vllm extra)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # -- the model deployment: replicas, autoscaling, resources
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(32, ge=1, description="Per model replica; beyond it requests queue")
    max_queued_requests: int = Field(64, ge=-1, description="Queue bound before 503 + Retry-After (-1: unbounded)")
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    replica_cpus: float = Field(0.5, gt=0, description="CPUs per model replica (fractional works)")
    replica_gpus: float | Literal["auto"] = Field("auto", description="'auto': 1 GPU per replica when the cluster has GPUs")
    ingress_cpus: float = Field(0.25, gt=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="Open streams per ingress replica")
    health_check_period_s: float = Field(10, gt=0)
    health_check_timeout_s: float = Field(30, gt=0)
    max_batch_size: int = Field(16, ge=1, description="Sequences decoded together in one replica")
    stream_interval_ms: float = Field(
        50, ge=0, description="A streamed reply's deltas go out at most this often, merged (the first at once); 0: every token")
    # -- request limits (each violation is a 4xx naming the field)
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(4000, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    max_choices: int = Field(8, ge=1, le=128, description="Choices per request at most: n, times the prompts of a list prompt")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header on 503")
    # -- access and content
    api_keys_file: str | None = Field(None, description="One key per line; also ZHCHAT_API_KEYS (comma-separated)")
    blocklist_file: str | None = Field(None, description="One word per line, 're:' for a regex, '#' comments")
    blocked_reply: str = "抱歉，这个问题我不能回答。"
    blocklist_retries: int = Field(2, ge=0, description="Regenerations (new seed) before the blocked_reply")
    model_name: str = Field("zhchat", description="Name reported by /v1/models and in responses")
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.generation.max_tokens > self.generation.max_tokens_cap:
            raise ValueError("generation.max_tokens must be <= generation.max_tokens_cap")
        return self
