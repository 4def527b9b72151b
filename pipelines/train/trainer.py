"""`zhchat train`: the driver. Checks the inputs, launches Ray Train, reports where things are.

Run folder OUT/NAME (local or s3:// / gs://) holds Ray's checkpoints
(checkpoint_stepNNNNNNN/, HF format + trainer_state.pt), metrics.jsonl, tensorboard/,
loss_curve.png and latest.json. Running the same command again resumes from the latest
checkpoint; a run that already reached max_steps is reported, not silently skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time

from zhchat.config import RunConfig, is_uri
from zhchat.report import kv_table, say
from zhchat.storage import join, local_copy, read_text

from .checkpoint import failure_records, finished_step, run_name, write_pointers
from pipelines.manifest import context_length, data_format, load_manifest

from .data import read_split, split_dir
from .loop import LoopConfig, train_loop_per_worker
from .metrics import LOSS_PNG, METRICS_FILE, TB_DIR, plot_loss_curve, read_metrics


class TrainingDiverged(ValueError):
    """The loss became NaN/inf; the message names the last good checkpoint."""


def check_shards_vocab(data_dir: str, vocab_size: int) -> None:
    """Token ids in a train shard must fit the tokenizer: catches shards from another tokenizer."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from zhchat.storage import filesystem

    fs, p = filesystem(split_dir(data_dir, "train"))
    ds = pads.dataset(p, filesystem=fs, format="parquet")
    frags = list(ds.get_fragments())
    if not frags:
        raise FileNotFoundError(f"{split_dir(data_dir, 'train')} holds no Parquet files; re-run `zhchat preprocess`")
    col = frags[0].to_table(columns=["input_ids"]).column("input_ids")
    top = pc.max(pc.list_flatten(col)).as_py()
    if top is not None and top >= vocab_size:
        raise ValueError(
            f"the shards in {data_dir} hold token id {top}, but {data_dir}/tokenizer has only {vocab_size} tokens: "
            "the shards were encoded with another tokenizer; re-run `zhchat preprocess`")


@contextlib.contextmanager
def quiet_data():
    """Datasets made inside get no progress bars: per-epoch bars from every worker drown
    the training log. Datasets snapshot the context when made, so restoring is safe."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def _use_gpu(choice: str) -> bool:
    import ray

    if choice == "yes":
        return True
    if choice == "no":
        return False
    return ray.cluster_resources().get("GPU", 0) > 0


def _cpus_per_worker(cfg_cpus: float, workers: int, use_gpu: bool) -> float:
    """Leave a quarter CPU for Ray Data's read tasks: workers holding every CPU next to a
    not-yet-executed dataset hang forever (RAY_NOTES, 2-CPU deadlock)."""
    from zhchat.runtime import cluster_cpus

    total = cluster_cpus()
    if use_gpu or workers * cfg_cpus <= total - 0.25:
        return cfg_cpus
    fitted = max(0.1, round((total - 0.25) / workers, 2))
    say(f"[yellow]train:[/] {workers} worker(s) x {cfg_cpus} CPU would take all {total} CPUs and starve the data "
        f"readers; using {fitted} CPU per worker")
    return fitted


def train(cfg: RunConfig, debug: dict | None = None) -> dict:
    """Train per cfg.train and return the summary. `debug` holds test hooks (see LoopConfig)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from zhchat.runtime import init_ray
    from zhchat.tokenizer import load_tokenizer

    from .model import check_same_vocab

    t = cfg.train
    if not t.data or not t.out:
        raise ValueError("train needs --data (the preprocess output) and --out (the runs folder)")
    init_ray(cfg.ray)
    data_dir = t.data
    manifest = load_manifest(data_dir)
    ctx_len = context_length(manifest)
    tokenizer = load_tokenizer(local_copy(join(data_dir, "tokenizer")), ctx_len)
    check_shards_vocab(data_dir, len(tokenizer))
    if t.init_from:
        check_same_vocab(tokenizer, load_tokenizer(t.init_from), data_dir, t.init_from)

    out = t.out if is_uri(t.out) else os.path.abspath(os.path.expanduser(t.out))
    name = run_name(t, data_dir)
    run_dir = join(out, name)
    done = finished_step(run_dir)
    if done is not None and done >= t.max_steps:
        say(f"[bold yellow]train:[/] run {name!r} already finished at step {done} (max_steps {t.max_steps}); "
            f"nothing to train. Its results are in {run_dir}. Use another --name to train a new run, "
            "or raise --max-steps to continue this one.")
        return {"run_dir": run_dir, "name": name, "already_finished": True, "step": done,
                **_pointer_paths(run_dir)}

    use_gpu = _use_gpu(t.use_gpu)
    with quiet_data():
        train_ds = read_split(data_dir, "train")
        n_train = train_ds.count()
        if n_train < t.global_batch_size:
            raise ValueError(f"the train split has {n_train} sequences, fewer than global_batch_size {t.global_batch_size}")
        datasets = {"train": train_ds}
        has_val = False
        try:
            # Small and read at every checkpoint: materialised once instead of re-read each time.
            val_ds = read_split(data_dir, "validation").limit(t.val_max_sequences).materialize()
            has_val = val_ds.count() > 0
        except FileNotFoundError:
            val_ds = None
    if has_val:
        datasets["validation"] = val_ds
    else:
        say("[yellow]train:[/] no validation split: checkpoints are ranked by training loss instead")
    score = "val_loss" if has_val else "train_loss"

    loop_cfg = LoopConfig(
        run_dir=run_dir, tokenizer=tokenizer, context_length=ctx_len, preset=t.preset, init_from=t.init_from,
        dropout=t.dropout, max_steps=t.max_steps, global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, lr=t.lr, min_lr_ratio=t.min_lr_ratio, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, grad_clip=t.grad_clip, seed=t.seed, shuffle_buffer=t.shuffle_buffer,
        checkpoint_every=t.checkpoint_every, checkpoint_every_minutes=t.checkpoint_every_minutes,
        log_every=t.log_every, precision=t.precision,
        torch_threads=t.torch_threads, cpus_per_worker=t.cpus_per_worker, peak_flops=t.peak_flops,
        has_validation=has_val,
        info={"run": name, "preset": None if t.init_from else t.preset, "init_from": t.init_from,
              "context_length": ctx_len, "data": data_dir,
              "loss_on": data_format(manifest).get("loss_on")},
        debug=dict(debug or {}),
    )
    workers = (t.min_workers, t.num_workers) if t.min_workers is not None else t.num_workers
    resources = {"CPU": _cpus_per_worker(t.cpus_per_worker, t.num_workers, use_gpu)}
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # deterministic block order: exact resume
    # The train split is not split between workers: each reads the whole stream in the same
    # order and takes its slice of every global batch (data.epoch_batches), so the data goes
    # on at the same global sample after the worker count changes. Validation is split: each
    # worker scores its part and the sums are all-reduced.
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={f.name: getattr(loop_cfg, f.name) for f in dataclasses.fields(loop_cfg)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["validation"] if has_val else [], execution_options=ingest),
        run_config=RayRunConfig(
            name=name, storage_path=out,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_last, checkpoint_score_attribute=score,
                                               checkpoint_score_order="min"),
        ),
    )
    say(f"[bold]train:[/] run {name!r} in {run_dir} — {t.num_workers if t.min_workers is None else workers} "
        f"worker(s), {'GPU' if use_gpu else 'CPU'}, {t.max_steps} steps of {t.global_batch_size} sequences")
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors; add where to resume from
        from ray.train import TrainingFailedError

        if isinstance(e, TrainingFailedError):
            records = failure_records(run_dir)
            where = (f" at step {records[-1]['step']}: {records[-1]['cause']}" if records else "")
            raise RuntimeError(
                f"training run {name!r} failed after {t.max_failures} retries{where}\n{e}\n"
                f"Checkpoints so far are in {run_dir}; run the same command again to resume from the latest one."
            ) from e
        raise
    elapsed = time.perf_counter() - t0
    outcome = dict(result.return_value or {})
    latest = result.checkpoint
    if outcome.get("status") == "diverged":
        where = f"the last good checkpoint is {latest.path}" if latest else "no checkpoint was saved before it"
        raise TrainingDiverged(
            f"training diverged: the loss became {outcome.get('loss')} at step {outcome.get('step', 0) + 1}; "
            f"the broken update was not applied and not saved. {where}. Lower --lr (now {t.lr}), raise "
            f"warmup_steps, or use precision fp32/bf16 instead of fp16, then resume with the same command.")
    if outcome.get("status") == "failed_repeatedly":
        raise RuntimeError(
            f"training run {name!r} stopped: step {outcome['step']} failed in each of the last attempts "
            f"({outcome['cause']}); retrying it again would fail again. The latest checkpoint is "
            f"{latest.path if latest else 'not saved yet'}; fix the cause, then run the same command to resume.")
    if outcome.get("status") == "already_finished":
        say(f"[bold yellow]train:[/] run {name!r} had already reached step {outcome.get('step')}; nothing trained")
    return _finish(out, name, run_dir, result, score, elapsed)


def _checkpoint_name(ckpt) -> str:
    return ckpt.path.rstrip("/").rsplit("/", 1)[-1]


def _pointer_paths(run_dir: str) -> dict:
    return {"metrics": join(run_dir, METRICS_FILE), "tensorboard": join(run_dir, TB_DIR),
            "loss_curve": join(run_dir, LOSS_PNG)}


def _finish(out: str, name: str, run_dir: str, result, score: str, elapsed: float) -> dict:
    """Draw the loss curve, write latest.json pointers, print where everything is."""
    from zhchat.checkpoints import read_pointer

    metrics = dict(result.metrics or {})
    best = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(score) is not None]
    best_ckpt, best_metrics = min(best, key=lambda cm: cm[1][score]) if best else (result.checkpoint, metrics)
    if best_ckpt is None:  # e.g. an already-finished run restarted: keep what latest.json says
        previous = read_pointer(run_dir) or {}
        return {"run_dir": run_dir, "name": name, **previous}
    rows = read_metrics(read_text(join(run_dir, METRICS_FILE)) or "")
    png = None
    with tempfile.TemporaryDirectory() as tmp:
        local_png = plot_loss_curve(rows, os.path.join(tmp, LOSS_PNG), title=name)
        if local_png:
            png = join(run_dir, LOSS_PNG)
            if is_uri(png):
                from zhchat.storage import upload

                upload(local_png, png)
            else:
                os.replace(local_png, png)
    final_ckpt = result.checkpoint
    pointer = {
        "status": "finished", "name": name, "step": int(metrics.get("step", 0)),
        "best_checkpoint": _checkpoint_name(best_ckpt), "best_checkpoint_path": join(run_dir, _checkpoint_name(best_ckpt)),
        "latest_checkpoint": _checkpoint_name(final_ckpt) if final_ckpt else None,
        "best_metrics": {k: v for k, v in best_metrics.items() if isinstance(v, (int, float))},
        "final_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "seconds": round(elapsed, 1), **_pointer_paths(run_dir), "loss_curve": png,
    }
    write_pointers(out, name, pointer)
    kv_table(f"train: {name}", {
        "steps": pointer["step"],
        "final train loss": metrics.get("train_loss"),
        "final val loss": metrics.get("val_loss"),
        "final val perplexity": metrics.get("val_perplexity"),
        "best checkpoint": pointer["best_checkpoint_path"],
        "best val loss": best_metrics.get("val_loss"),
        "metrics (JSONL)": pointer["metrics"],
        "TensorBoard": pointer["tensorboard"],
        "loss curve": png,
        "wall time (s)": round(elapsed, 1),
    })
    # The summary names checkpoints by full path (latest.json keeps them relative to the run).
    return {"run_dir": run_dir, **pointer, "best_checkpoint": pointer["best_checkpoint_path"]}


def run_train(cfg: RunConfig, args) -> dict:
    return train(cfg)
