"""One optimizer step of GPT-2 training in plain PyTorch: model, optimizer, LR schedule,
precision (autocast + GradScaler), gradient accumulation and the step's collectives.

No Ray here: Ray Train (loop.py) wraps it, and bench/gpu_check.py runs it alone on a GPU
box that has no Ray. The step's maths: the loss is the sum of token NLLs divided by the
number of loss tokens in the whole global batch (all-reduced first), so 1 worker x 2
micro-batches and 2 workers x 1 give the same gradient, not just the same batch size.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from zhchat.dialogue import IGNORE_INDEX
from zhchat.runtime import autocast_dtype

from .data import count_targets, micro_batches
from .loss import sum_cross_entropy


def lr_lambda(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps (multiplier of lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (incl. embeddings), none on biases and LayerNorms.
    The fused kernel (one pass over each parameter, GradScaler's unscale folded in) on CUDA
    and CPU alike: on CPU it makes the step ~3% faster than the foreach default."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type in ("cuda", "cpu"))


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over positions whose (shifted) label is not -100.

    Shifting the labels instead of the logits avoids copying the [B, T, V] logits; the loss is
    computed in cache-sized row chunks (loss.py), never as a [B, T, V] fp32 log-softmax.
    """
    logits = model(input_ids=input_ids).logits  # [B, T, V]
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)  # [B, T]
    return sum_cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), IGNORE_INDEX)


def accumulate_gradients(model, chunks: list[dict], n_targets: int, world: int, device, amp=contextlib.nullcontext,
                         scaler=None, poison: bool = False) -> torch.Tensor:
    """Backward over one worker's micro-batches; returns the summed NLL (float64 scalar).

    Each micro-batch's loss is its NLL sum x world / n_targets, n_targets counting the whole
    global batch: DDP then averages over workers, giving sum(NLL) / n_targets exactly.
    Gradients are synchronised only on the last micro-batch (no_sync before it).
    """
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, mb in enumerate(chunks):
        sync = not hasattr(model, "no_sync") or i == len(chunks) - 1
        with (contextlib.nullcontext() if sync else model.no_sync()):
            x = torch.from_numpy(mb["input_ids"]).to(device, non_blocking=True)  # [b, t]
            y = torch.from_numpy(mb["labels"]).to(device, non_blocking=True)     # [b, t]
            with amp():
                nll = token_nll(model, x, y)
            if poison:  # test hook: what a diverged step looks like
                nll = nll * float("nan")
            loss = nll * (world / n_targets)
            (scaler.scale(loss) if scaler else loss).backward()
        nll_sum += nll.detach().double()
    return nll_sum


class Collectives:
    """The all-reduces outside DDP, always on the training device: NCCL reduces only CUDA
    tensors ("No backend type associated with device type cpu"), so a tensor made with
    the default device would stop a multi-GPU run at its first step. A no-op for one worker."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, torch.device(device)

    def tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


class Precision:
    """Autocast dtype and GradScaler for a device (zhchat.runtime.autocast_dtype's rule:
    bf16 on GPUs with native bf16, fp16 + GradScaler on older ones, fp32 on CPU)."""

    def __init__(self, device: torch.device, precision: str = "auto", init_scale: float = 2.0**16):
        self.device = torch.device(device)
        self.dtype = autocast_dtype(self.device.type, precision)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale) if self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass
class StepResult:
    loss: float         # mean NLL per loss token over the global batch
    grad_norm: float    # before clipping, averaged over workers
    n_targets: int      # loss tokens in the global batch
    n_tokens: int       # tokens in the global batch
    applied: bool       # False: the GradScaler skipped the update (fp16 overflow), or the loss is not finite
    finite: bool
    flag: float         # the all-reduced sum of the callers' `flag` (e.g. "checkpoint now")


class TrainStep:
    """Model + optimizer + schedule + precision of one worker; `run` does one optimizer step.

    A step the GradScaler skips (inf/NaN gradients in fp16) advances neither the LR schedule
    nor `step`: the caller counts only applied steps, and the scaler's state travels in
    checkpoints (state_dict) so a resumed fp16 run scales exactly as an uninterrupted one.
    """

    def __init__(self, model, raw, device, world: int, *, lr: float, weight_decay: float, warmup_steps: int,
                 max_steps: int, min_lr_ratio: float, grad_clip: float, micro_batch_size: int,
                 precision: str = "auto", init_scale: float = 2.0**16):
        self.model, self.raw = model, raw  # model: DDP-wrapped (or not); raw: the GPT2LMHeadModel
        self.device = torch.device(device)
        self.world, self.grad_clip, self.micro = world, grad_clip, micro_batch_size
        self.dist = Collectives(world, self.device)
        self.precision = Precision(self.device, precision, init_scale)
        self.optimizer = make_optimizer(raw, lr, weight_decay, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, warmup_steps, max_steps, min_lr_ratio))

    @property
    def scaler(self):
        return self.precision.scaler

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def run(self, batch: dict, flag: float = 0.0, poison: bool = False) -> StepResult:
        """One optimizer step on this worker's share of a collated global batch."""
        counts = self.dist.sum(self.dist.tensor([count_targets(batch["labels"]), int(batch["lengths"].sum())]))
        n_targets, n_tokens = max(int(counts[0]), 1), int(counts[1])
        scaler = self.scaler
        nll_sum = accumulate_gradients(self.model, micro_batches(batch, self.micro), n_targets, self.world,
                                       self.device, self.precision.autocast, scaler, poison=poison)
        if scaler:
            scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), self.grad_clip)
        stats = torch.stack([nll_sum, grad_norm.detach().double().to(self.device),
                             self.dist.tensor(float(flag))])
        self.dist.sum(stats)
        loss, norm, flag_sum = stats.tolist()
        loss /= n_targets
        # fp16: inf/NaN gradients are the scaler's business (it skips the step); the loss must be finite.
        finite = math.isfinite(loss) and (scaler is not None or math.isfinite(norm))
        applied = False
        if finite:
            if scaler:
                before = scaler.get_scale()
                scaler.step(self.optimizer)
                scaler.update()
                applied = scaler.get_scale() >= before  # the scale backs off only on a skipped step
            else:
                self.optimizer.step()
                applied = True
            if applied:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, norm / self.world, n_targets, n_tokens, applied, finite, flag_sum)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
