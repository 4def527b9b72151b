"""Config for training (pipelines/train); evaluation's is in eval.py."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class TrainConfig(Section):
    data: str | None = Field(None, description="Folder written by preprocess (tokenized shards + tokenizer)")
    out: str | None = Field(None, description="Folder holding runs (local path or s3:// / gs:// URI); a run is OUT/NAME")
    name: str | None = Field(None, description="Run name; the same name and out resume the run (None: derived from preset and data)")
    preset: Literal["tiny", "small", "gpt2", "gpt2-medium"] = "small"
    init_from: str | None = Field(None, description="Fine-tune this pretrained GPT-2 (local path or hub id) instead of a preset")
    dropout: float | None = Field(None, ge=0, lt=1, description="None: 0.0 for presets, the model's own for init_from")
    max_steps: int = Field(600, ge=1, description="Optimizer steps; epochs repeat as needed")
    global_batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, whatever the worker count")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass per worker (gradient accumulation makes up the rest)")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = Field(30, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 1234
    shuffle_buffer: int = Field(1024, ge=0, description="Rows in each worker's local shuffle buffer (0: file order)")
    num_workers: int = Field(1, ge=1)
    min_workers: int | None = Field(None, ge=1, description="Set for elastic training: (min_workers, num_workers)")
    cpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1, description="None: the worker's CPU share (all cores for one CPU worker)")
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU")
    peak_flops: float | None = Field(None, gt=0, description="Per-device peak FLOP/s for MFU where it is not in the GPU table (e.g. a measured CPU GEMM rate)")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every this many steps")
    checkpoint_every_minutes: float | None = Field(
        None, gt=0, description="Also checkpoint when this many minutes passed since the last one: a lost node "
        "or a resize then costs minutes of training, not up to checkpoint_every steps")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept: the best keep_last by validation loss, plus always the latest")
    log_every: int = Field(10, ge=1)
    val_max_sequences: int = Field(1024, ge=1, description="Validation sequences scored at each checkpoint")
    max_failures: int = Field(3, ge=-1, description="Worker/node failures to recover from (-1: forever; a step "
                              "that fails in 3 attempts in a row still ends the run)")

    @model_validator(mode="after")
    def _batches(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError("min_workers must be <= num_workers")
        low = self.min_workers or self.num_workers
        counts = range(low, self.num_workers + 1)
        bad = [w for w in counts if self.global_batch_size % w]
        if bad:
            # Every worker count the run may reach must split the global batch exactly, or an
            # elastic run would silently train on fewer sequences after a resize.
            lcm = math.lcm(*counts)
            fix = -(-self.global_batch_size // lcm) * lcm
            if low == self.num_workers:
                raise ValueError(
                    f"global_batch_size {self.global_batch_size} is not divisible by num_workers {self.num_workers}; "
                    f"every worker takes an equal share of each step (e.g. global_batch_size {fix})")
            good = [w for w in counts if not self.global_batch_size % w]
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not divisible by {', '.join(map(str, bad))} of the "
                f"{low}..{self.num_workers} workers this elastic run may have; every worker takes an equal share of "
                f"each step. Worker counts that work: {', '.join(map(str, good)) or 'none'}; set min_workers/num_workers "
                f"to a range of those, or a global_batch_size divisible by every count in it (e.g. {fix})")
        return self
