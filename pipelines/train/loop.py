"""The training loop each Ray Train worker runs (DDP over gloo on CPU, NCCL on GPU).

One optimizer step consumes `global_batch_size` sequences whatever the worker count:
each worker takes global/world of them and accumulates gradients over micro-batches
(the step itself, Ray-free, is step.py).

Resume is exact for a given seed, also at another worker count: the data order is a
function of (seed, epoch) alone and each worker takes its slice of every global batch
(data.epoch_batches), consumed global batches are skipped, and the RNG is reseeded from
(seed, step, rank) before every step, so dropout does not depend on where the run was
interrupted.

Checkpoints come every `checkpoint_every` steps and, when set, every
`checkpoint_every_minutes` (rank 0's clock, agreed through the step's all-reduce), so a
lost node or a resize costs at most that much training, plus the restart.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

from zhchat.storage import write_text

from .checkpoint import (checkpoint_dir_name, failure_records, load_state, record_failure, repeated_failure,
                         save_checkpoint, set_rng_states)
from .data import collate, count_targets, epoch_batches, row_ids
from .metrics import MetricsLogger, device_peak_flops, echo
from .model import SpecialIds, build_model, count_params, flops_per_token, load_pretrained, load_training_model
from .step import Collectives, TrainStep, token_nll


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
    checkpoint_every_minutes: float | None
    log_every: int
    precision: str
    torch_threads: int | None
    cpus_per_worker: float
    peak_flops: float | None
    has_validation: bool
    info: dict = field(default_factory=dict)   # written into each checkpoint's zhchat.json
    # test hooks: fail_at_step, fail_always_at_step, nan_at_step, sleep_per_step, row_log (a folder),
    # init_scale (the GradScaler's first scale)
    debug: dict = field(default_factory=dict)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from. torch.manual_seed also seeds every CUDA and
    MTIA device, and where those are not initialised (any CPU run) it formats a stack trace
    for a deferred call on each of them: 0.4% of a CPU training step (py-spy). Reseeding
    every step is also why checkpoints need no CUDA RNG state: a worker that comes back on
    another GPU, or sees fewer GPUs after a resize, draws the same dropout masks."""
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


def evaluate_loss(model, shard, batch_size: int, pad_id: int, device, amp, dist: Collectives) -> tuple[float, int]:
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
    """Returns {'status': finished | diverged | already_finished | failed_repeatedly, 'step': ...}
    (Ray hands rank 0's to the driver)."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = LoopConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(worker_threads(cfg, world, device))
    dist = Collectives(world, device)
    tok = cfg.tokenizer
    ids = SpecialIds.of(tok)

    # -- model and state: from the latest checkpoint, else built fresh --------------------------
    state: dict | None = None
    checkpoint = ray.train.get_checkpoint()
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = load_training_model(d)
            state = load_state(d)
    elif cfg.init_from:
        model = load_pretrained(cfg.init_from, tok, cfg.context_length, cfg.dropout)
    else:
        model = build_model(cfg.preset, len(tok), cfg.context_length, ids, cfg.dropout)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    raw = model.module if hasattr(model, "module") else model
    trainer = TrainStep(model, raw, device, world, lr=cfg.lr, weight_decay=cfg.weight_decay,
                        warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio,
                        grad_clip=cfg.grad_clip, micro_batch_size=cfg.micro_batch_size, precision=cfg.precision,
                        init_scale=cfg.debug.get("init_scale", 2.0**16))
    # step: optimizer steps applied; batches: global batches consumed in this epoch (more than
    # the steps taken in it when the fp16 scaler skipped some).
    step, epoch, batches, tokens_seen = 0, 0, 0, 0
    if state is not None:
        trainer.load_state_dict(state)
        step, epoch = state["step"], state["epoch"]
        batches = state.get("batches_in_epoch", state.get("step_in_epoch", 0))
        tokens_seen = state.get("tokens_seen", 0)
        set_rng_states(state["rng"])
    start_step = step

    # One id per attempt, the same on every rank, and rank 0's verdict on repeated failures.
    verdict = dist.tensor([int.from_bytes(os.urandom(6), "little") if rank == 0 else 0, 0])
    if rank == 0:
        verdict[1] = repeated_failure(failure_records(cfg.run_dir), after_step=step) or 0
    dist.sum(verdict)
    attempt, stuck_at = int(verdict[0]), int(verdict[1])
    if stuck_at:
        cause = next(r["cause"] for r in failure_records(cfg.run_dir) if r["step"] == stuck_at)
        if rank == 0:
            echo(f"[train] step {stuck_at} failed in every one of the last attempts ({cause}); not retrying it again")
        return {"status": "failed_repeatedly", "step": stuck_at, "cause": cause}

    if cfg.global_batch_size % world:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} does not split over {world} workers "
                         "(the config check should have refused this worker range)")
    per_worker = cfg.global_batch_size // world
    accum = math.ceil(per_worker / cfg.micro_batch_size)
    fpt = flops_per_token(raw, cfg.context_length)
    amp = trainer.precision.autocast
    peak = device_peak_flops(str(device), trainer.precision.dtype is not None, cfg.peak_flops)

    log = MetricsLogger(cfg.run_dir) if rank == 0 else None
    if log:
        log.event(step, "resume" if state else "start", world_size=world, per_worker_batch=per_worker,
                  accumulation=accum, params=count_params(raw), device=str(device),
                  threads=torch.get_num_threads(), precision=trainer.precision.name,
                  node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid(),
                  epoch=epoch, batches_in_epoch=batches)
        echo(f"[train] {'resuming at step ' + str(step) if state else 'starting'}: {world} worker(s) x "
              f"{per_worker} sequences ({accum} micro-batch(es) of <= {cfg.micro_batch_size}) = "
              f"{per_worker * world} per step; {count_params(raw) / 1e6:.1f}M params on {device}, "
              f"{trainer.precision.name}, {torch.get_num_threads()} thread(s)")

    train_stream = ray.train.get_dataset_shard("train")  # the whole split on every worker
    val_shard = ray.train.get_dataset_shard("validation") if cfg.has_validation else None
    window = {"nll": 0.0, "targets": 0, "tokens": 0, "t0": time.perf_counter(), "steps": 0}
    last = {"loss": float("nan"), "checkpoint_t": time.monotonic()}

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
                save_checkpoint(tmp, raw, tok, trainer.state_dict(),
                                {"step": step, "epoch": epoch, "batches_in_epoch": batches,
                                 "tokens_seen": tokens_seen, "world_size": world},
                                {**cfg.info, **{k: v for k, v in metrics.items() if k.startswith("val")}})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                log.event(step, "checkpoint", name=checkpoint_dir_name(step))
                log.sync()
            # A barrier: Ray uploads the folder and registers it before anyone goes on.
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(step))
        window["t0"] = time.perf_counter()  # validation and saving are not training throughput
        last["checkpoint_t"] = time.monotonic()

    if step >= cfg.max_steps:
        # A finished run started again: nothing to train. Say so instead of silently exiting.
        if log:
            echo(f"[train] run already finished at step {step} (max_steps {cfg.max_steps}); nothing to do")
            log.close()
        return {"status": "already_finished", "step": step}

    row_log = cfg.debug.get("row_log")
    model.train()
    try:
        while step < cfg.max_steps:
            skip, consumed = batches, 0
            for batch in epoch_batches(train_stream, epoch, cfg.seed, rank, world, cfg.global_batch_size,
                                       cfg.shuffle_buffer, skip=skip):
                consumed += 1
                if window["steps"] == 0 and window["tokens"] == 0 and step == start_step:
                    window["t0"] = time.perf_counter()  # throughput excludes start-up (imports, data pipeline)
                if cfg.debug.get("fail_always_at_step") == step + 1:
                    raise RuntimeError(f"injected failure at step {step + 1} (test hook, every attempt)")
                # Dropout and any other randomness depend only on (seed, step, rank).
                seed_step((cfg.seed * 1_000_003 + step * 7_919 + rank) % (2**63), device)
                due = (rank == 0 and cfg.checkpoint_every_minutes is not None
                       and time.monotonic() - last["checkpoint_t"] >= cfg.checkpoint_every_minutes * 60)
                r = trainer.run(collate(batch, ids.pad), flag=float(due),
                                poison=cfg.debug.get("nan_at_step") == step + 1)
                if not r.finite:
                    # Stop before the broken update reaches the weights; the last checkpoint is intact.
                    if log:
                        log.event(step, "diverged", loss=str(r.loss))
                        log.close()
                    # Every rank sees the same all-reduced values, so all stop here together.
                    return {"status": "diverged", "step": step, "loss": str(r.loss)}
                batches += 1
                if row_log:
                    write_text(os.path.join(row_log, f"{attempt}-{rank}-{step + 1}-{batches}.json"), json.dumps(
                        {"attempt_start": start_step, "step": step + 1, "applied": r.applied, "epoch": epoch,
                         "rank": rank, "rows": row_ids(batch)}))
                if not r.applied:  # the fp16 scaler skipped it: no step, no schedule, same step number
                    if log:
                        log.event(step, "skipped_step", scale=trainer.scaler.get_scale())
                    continue
                step += 1
                tokens_seen += r.n_tokens
                last["loss"] = r.loss
                window["nll"] += r.loss * r.n_targets
                window["targets"] += r.n_targets
                window["tokens"] += r.n_tokens
                window["steps"] += 1

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                    tps = window["tokens"] / elapsed
                    values = {"loss": window["nll"] / max(window["targets"], 1), "lr": trainer.lr,
                              "grad_norm": r.grad_norm, "tokens_per_s": tps, "epoch": epoch}
                    if peak:
                        values["mfu"] = fpt * tps / (peak * world)
                    if trainer.scaler is not None:
                        values["loss_scale"] = trainer.scaler.get_scale()
                    if log:
                        log.log(step, values)
                    window.update(nll=0.0, targets=0, tokens=0, steps=0, t0=time.perf_counter())

                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or r.flag > 0:
                    checkpoint_and_report(final=step == cfg.max_steps)
                if cfg.debug.get("sleep_per_step"):  # test hook: time to kill a node or a worker mid-run
                    time.sleep(cfg.debug["sleep_per_step"])
                if cfg.debug.get("fail_at_step") == step and start_step == 0:  # only the first attempt
                    raise RuntimeError(f"injected failure after step {step} (test hook)")
                if step >= cfg.max_steps:
                    break
            else:
                if consumed == 0 and skip == 0:
                    raise ValueError(
                        f"the train split gives no full global batch of {cfg.global_batch_size} sequences; "
                        f"lower global_batch_size or add data")
                epoch += 1
                batches = 0
    except Exception as e:
        # Ray retries the attempt from the last checkpoint; the record lets the next attempt
        # (and the driver's error message) see a step that fails every time.
        record_failure(cfg.run_dir, attempt=attempt, rank=rank, step=step + 1, cause=f"{type(e).__name__}: {e}")
        raise
    if log:
        log.close()
    return {"status": "finished", "step": step}
