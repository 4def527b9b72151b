"""Config for the chat service (services/)."""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import Section


class GenerationDefaults(Section):
    max_tokens: int = Field(64, ge=1)
    max_tokens_cap: int = Field(512, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.2, ge=1, le=3)
    no_repeat_ngram_size: int = Field(3, ge=0)


class ServeConfig(Section):
    model: str | None = Field(None, description="Checkpoint folder or cloud URI")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    max_ongoing_requests: int = Field(32, ge=1)
    upscale_delay_s: float = Field(5, ge=0)
    downscale_delay_s: float = Field(30, ge=0)
    replica_cpus: float = Field(0.5, gt=0)
    max_batch_size: int = Field(16, ge=1)
    api_keys_file: str | None = Field(None, description="One key per line; also ZHCHAT_API_KEYS (comma-separated)")
    blocklist_file: str | None = None
    blocked_reply: str = "抱歉，这个问题我不能回答。"
    generation: GenerationDefaults = Field(default_factory=GenerationDefaults)

    @model_validator(mode="after")
    def _replicas(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self
