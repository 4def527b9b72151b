"""Config for training and evaluation (pipelines/train, pipelines/evaluate)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class TrainConfig(Section):
    data: str | None = Field(None, description="Folder written by preprocess (tokenized shards + tokenizer)")
    out: str | None = Field(None, description="Run folder (local path or s3:// / gs:// URI)")
    name: str | None = Field(None, description="Run name; the same name and out resume the run")
    preset: Literal["tiny", "small", "gpt2", "gpt2-medium"] = "small"
    init_from: str | None = Field(None, description="Fine-tune this pretrained GPT-2 (local path or hub id)")
    max_steps: int = Field(600, ge=1)
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, whatever the worker count")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass per worker")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 1234
    num_workers: int = Field(1, ge=1)
    min_workers: int | None = Field(None, ge=1, description="Set for elastic training: (min_workers, num_workers)")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(3, ge=-1)

    @model_validator(mode="after")
    def _batches(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError("min_workers must be <= num_workers")
        return self


class EvalConfig(Section):
    model: str | None = Field(None, description="Checkpoint folder, or a run folder (its best checkpoint)")
    data: str | None = Field(None, description="Folder written by preprocess")
    max_new_tokens: int = Field(48, ge=1)
    max_samples: int = Field(200, ge=1, description="Test contexts to generate replies for")
    batch_size: int = Field(16, ge=1)
