"""Config for evaluation (pipelines/evaluate.py). Its reply sampling takes the fields and
bounds of the one sampling schema (zhchat/engine/params.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..engine import params as sp
from ..engine.types import EngineName
from .base import Section


class EvalConfig(Section):
    model: str | None = Field(None, description="Checkpoint folder, or a run folder (its best checkpoint)")
    data: str | None = Field(None, description="Folder written by preprocess")
    engine: EngineName = Field("zhchat", description="Engine generating the sample replies (zhchat or vllm)")
    max_new_tokens: sp.MaxTokens = 48
    max_samples: int = Field(200, ge=1, description="Test contexts to generate replies for")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass / replies per generation batch")
    actors: int | None = Field(None, ge=1, description="Model replicas scoring and generating (None: one per 2 cluster CPUs, at most 4)")
    cpus_per_actor: float = Field(1.0, gt=0)
    use_gpu: Literal["auto", "yes", "no"] = Field(
        "auto", description="One GPU per model actor, never more actors than GPUs; auto: if the cluster has GPUs now")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Scoring autocast, the training rule")
    temperature: sp.Temperature = sp.DEFAULTS.temperature
    top_p: sp.TopP = sp.DEFAULTS.top_p
    top_k: sp.TopK = sp.DEFAULTS.top_k
    repetition_penalty: sp.RepetitionPenalty = sp.DEFAULTS.repetition_penalty
    presence_penalty: sp.PresencePenalty = sp.DEFAULTS.presence_penalty
    frequency_penalty: sp.FrequencyPenalty = sp.DEFAULTS.frequency_penalty
    no_repeat_ngram_size: sp.NgramSize = sp.DEFAULTS.no_repeat_ngram_size
    seed: sp.Seed = 0
    show_samples: int = Field(10, ge=0, description="Sample dialogues in the Markdown report")

    def sampling(self) -> dict:
        """The reply sampling as SamplingParams fields (plain values: they travel to Ray actors)."""
        return sp.SamplingParams.from_defaults(self, max_tokens=self.max_new_tokens).to_dict()
