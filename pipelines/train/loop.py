"""The training loop each Ray Train worker runs (DDP over gloo on CPU, NCCL on GPU).

One optimizer step consumes `global_batch_size` sequences whatever the worker count:
each worker takes global/world of them and accumulates gradients over micro-batches.
The loss is the sum of token NLLs divided by the number of loss tokens in the whole
global batch (all-reduced first), so 1 worker x 2 micro-batches and 2 workers x 1 give
the same gradient, not just the same batch size.

Resume is exact for a given seed: the data order is a function of (seed, epoch, rank),
consumed batches are skipped, and the RNG is reseeded from (seed, step, rank) before
every step, so dropout does not depend on where the run was interrupted.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zhchat.dialogue import IGNORE_INDEX
from zhchat.runtime import autocast_dtype

from .checkpoint import checkpoint_dir_name, load_state, save_checkpoint, set_rng_states
from .data import collate, count_targets, epoch_batches, micro_batches
from .metrics import MetricsLogger, device_peak_flops, echo
from .model import SpecialIds, build_model, count_params, flops_per_token, load_pretrained


@dataclass
class LoopConfig:
    """Everything a worker needs, built by the driver (pipelines/train/trainer.py)."""

    run_dir: str
    tokenizer: object                 # the shards' tokenizer (pickled to the workers)
    context_length: int
    preset: str
    init_from: str | None
    dropout: float | None
    max_steps: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    seed: int
    shuffle_buffer: int
    checkpoint_every: int
    log_every: int
    precision: str
    torch_threads: int | None
    cpus_per_worker: float
    peak_flops: float | None
    has_validation: bool
    info: dict = field(default_factory=dict)   # written into each checkpoint's zhchat.json
    debug: dict = field(default_factory=dict)  # test hooks: fail_at_step, nan_at_step, sleep_per_step


def lr_lambda(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at max_steps (multiplier of lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (incl. embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token NLL over positions whose (shifted) label is not -100.

    Shifting the labels instead of the logits avoids copying the [B, T, V] logits.
    """
    logits = model(input_ids=input_ids).logits  # [B, T, V]
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)  # [B, T]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


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


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from. torch.manual_seed also seeds every CUDA and
    MTIA device, and where those are not initialised (any CPU run) it formats a stack trace
    for a deferred call on each of them: 0.4% of a CPU training step (py-spy)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this device's generator (dropout on the GPU)


def worker_threads(cfg: LoopConfig, world: int, device: torch.device) -> int:
    """Threads for this worker: its CPU share (Ray gives workers OMP_NUM_THREADS=1), or every
    core for a lone CPU worker, which is the laptop quickstart."""
    if cfg.torch_threads:
        return cfg.torch_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu" and world == 1:
        return cores
    if device.type == "cpu":
        return max(1, min(cores, int(cfg.cpus_per_worker)))
    return max(1, min(4, cores))  # a GPU worker needs a few threads for data and the Python loop


class _Dist:
    """All-reduce that is a no-op for one worker (no collective cost in the common case)."""

    def __init__(self, world: int):
        self.world = world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def evaluate_loss(model, shard, batch_size: int, pad_id: int, device, amp, dist: _Dist) -> tuple[float, int]:
    """(token-weighted mean NLL, tokens) over the validation shards of all workers."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False):
            b = collate(batch, pad_id)
            ids = torch.from_numpy(b["input_ids"]).to(device)
            labels = torch.from_numpy(b["labels"]).to(device)
            with amp():
                totals[0] += token_nll(model, ids, labels).double()
            totals[1] += count_targets(b["labels"])
    model.train()
    dist.sum(totals)
    n = int(totals[1].item())
    return (totals[0].item() / n if n else float("nan")), n


def train_loop_per_worker(config: dict) -> dict:
    """Returns {'status': finished | diverged | already_finished, 'step': ...} (Ray hands rank 0's to the driver)."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = LoopConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(cfg, world, device))
    dist = _Dist(world)
    tok = cfg.tokenizer
    ids = SpecialIds.of(tok)

    # -- model and state: from the latest checkpoint, else built fresh --------------------------
    state: dict | None = None
    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    if checkpoint is not None:
        from transformers import GPT2LMHeadModel

        with checkpoint.as_directory() as d:
            model = GPT2LMHeadModel.from_pretrained(d)
            state = load_state(d)
        model.config.use_cache = False
    elif cfg.init_from:
        model = load_pretrained(cfg.init_from, tok, cfg.context_length, cfg.dropout)
    else:
        model = build_model(cfg.preset, len(tok), cfg.context_length, ids, cfg.dropout)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    raw = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(raw, cfg.lr, cfg.weight_decay, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    step, epoch, step_in_epoch, tokens_seen = 0, 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        tokens_seen = state.get("tokens_seen", 0)
        set_rng_states(state["rng"])
    start_step = step

    amp_dtype = autocast_dtype(device.type, cfg.precision)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    per_worker = cfg.global_batch_size // world
    if per_worker == 0:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is smaller than the {world} workers")
    accum = math.ceil(per_worker / cfg.micro_batch_size)
    fpt = flops_per_token(raw, cfg.context_length)
    peak = device_peak_flops(str(device), amp_dtype is not None, cfg.peak_flops)

    log = MetricsLogger(cfg.run_dir) if rank == 0 else None
    if log:
        log.event(step, "resume" if state else "start", world_size=world, per_worker_batch=per_worker,
                  accumulation=accum, params=count_params(raw), device=str(device),
                  threads=torch.get_num_threads(), precision=str(amp_dtype or "fp32"),
                  node_id=ray.get_runtime_context().get_node_id())
        echo(f"[train] {'resuming at step ' + str(step) if state else 'starting'}: {world} worker(s) x "
              f"{per_worker} sequences ({accum} micro-batch(es) of <= {cfg.micro_batch_size}) = "
              f"{per_worker * world} per step; {count_params(raw) / 1e6:.1f}M params on {device}, "
              f"{torch.get_num_threads()} thread(s)")
        if cfg.global_batch_size % world:
            echo(f"[train] warning: {cfg.global_batch_size} sequences do not split over {world} workers; "
                 f"using {per_worker * world} per step")

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if cfg.has_validation else None
    window = {"nll": 0.0, "targets": 0, "tokens": 0, "t0": time.perf_counter(), "steps": 0}
    last = {"loss": float("nan")}

    def checkpoint_and_report(final: bool) -> None:
        metrics = {"step": step, "epoch": epoch, "train_loss": last["loss"], "tokens_seen": tokens_seen,
                   "start_step": start_step, "world_size": world}
        if val_shard is not None:
            val_loss, n = evaluate_loss(raw, val_shard, cfg.micro_batch_size, ids.pad, device, amp, dist)
            metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)), val_tokens=n)
            if log:
                log.log(step, {"val_loss": val_loss, "val_perplexity": metrics["val_perplexity"]}, kind="val")
        if final:
            metrics["final"] = 1
        with tempfile.TemporaryDirectory(prefix="zhchat-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, raw, tok, optimizer, scheduler,
                                {"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                                 "tokens_seen": tokens_seen, "world_size": world},
                                {**cfg.info, **{k: v for k, v in metrics.items() if k.startswith("val")}})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log.event(step, "checkpoint", name=checkpoint_dir_name(step))
                log.sync()
            # A barrier: Ray uploads the folder and registers it before anyone goes on.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step))
        window["t0"] = time.perf_counter()  # validation and saving are not training throughput

    if step >= cfg.max_steps:
        # A finished run started again: nothing to train. Say so instead of silently exiting.
        if log:
            echo(f"[train] run already finished at step {step} (max_steps {cfg.max_steps}); nothing to do")
            log.close()
        return {"status": "already_finished", "step": step}

    model.train()
    while step < cfg.max_steps:
        batches_this_epoch = 0
        skip = step_in_epoch
        for batch in epoch_batches(train_shard, epoch, cfg.seed, rank, per_worker, cfg.shuffle_buffer, skip=skip):
            batches_this_epoch += 1
            if window["steps"] == 0 and window["tokens"] == 0 and step == start_step:
                window["t0"] = time.perf_counter()  # throughput excludes start-up (imports, data pipeline)
            # Dropout and any other randomness depend only on (seed, step, rank).
            seed_step((cfg.seed * 1_000_003 + step * 7_919 + rank) % (2**63), device)
            b = collate(batch, ids.pad)
            local = torch.tensor([count_targets(b["labels"]), int(b["lengths"].sum())], dtype=torch.float64)
            dist.sum(local)
            n_targets, n_tokens = max(int(local[0]), 1), int(local[1])
            poison = cfg.debug.get("nan_at_step") == step + 1
            nll_sum = accumulate_gradients(model, micro_batches(b, cfg.micro_batch_size), n_targets, world,
                                           device, amp, scaler, poison=poison)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            stats = torch.stack([nll_sum, grad_norm.detach().double().to(device)])
            dist.sum(stats)
            loss_value = stats[0].item() / n_targets
            finite = math.isfinite(loss_value) and (scaler is not None or math.isfinite(stats[1].item()))
            if not finite:
                # Stop before the broken update reaches the weights; the last checkpoint is intact.
                if log:
                    log.event(step, "diverged", loss=str(loss_value))
                    log.close()
                # Every rank sees the same all-reduced values, so all stop here together.
                return {"status": "diverged", "step": step, "loss": str(loss_value)}
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            tokens_seen += n_tokens
            last["loss"] = loss_value
            window["nll"] += stats[0].item()
            window["targets"] += n_targets
            window["tokens"] += n_tokens
            window["steps"] += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                tps = window["tokens"] / elapsed
                values = {"loss": window["nll"] / max(window["targets"], 1), "lr": scheduler.get_last_lr()[0],
                          "grad_norm": stats[1].item() / world, "tokens_per_s": tps, "epoch": epoch}
                if peak:
                    values["mfu"] = fpt * tps / (peak * world)
                if log:
                    log.log(step, values)
                window.update(nll=0.0, targets=0, tokens=0, steps=0, t0=time.perf_counter())

            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint_and_report(final=step == cfg.max_steps)
            if cfg.debug.get("sleep_per_step"):  # test hook: time to kill a node mid-run
                time.sleep(cfg.debug["sleep_per_step"])
            if cfg.debug.get("fail_at_step") == step and start_step == 0:  # only the first attempt
                raise RuntimeError(f"injected failure after step {step} (test hook)")
            if step >= cfg.max_steps:
                break
        else:
            if batches_this_epoch == 0 and skip == 0:
                raise ValueError(
                    f"the train split gives no full batch of {per_worker} sequences per worker; "
                    f"lower global_batch_size (now {cfg.global_batch_size}) or add data")
            epoch += 1
            step_in_epoch = 0
    if log:
        log.close()
    return {"status": "finished", "step": step}
