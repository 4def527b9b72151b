"""`zhchat train` end to end on the session Ray cluster with the tiny preset.

One run, whose training worker process is killed with SIGKILL after its first checkpoint
(Ray Train restarts it), serves most tests; two-worker and one-worker runs are compared
step by step; a step that fails in every attempt ends the run; a fine-tuning run hits an
injected NaN loss (a real divergence cannot be produced on demand, so LoopConfig.debug
injects it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from test_train_data import build_data_dir

TRAIN = dict(preset="tiny", global_batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=2,
             log_every=2, checkpoint_every=4, max_failures=1, shuffle_buffer=32)


def _cfg(data: str, out: str, **train):
    from zhchat.config import load_config

    return load_config(None, {"train": {"data": data, "out": out, **TRAIN, **train}}).resolved()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_data_dir(str(tmp_path_factory.mktemp("data")))


def _registered_steps(run_dir: str) -> list[int]:
    """Steps of the checkpoints Ray Train has registered (its snapshot file)."""
    import re

    snap = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    if not os.path.exists(snap):
        return []
    return sorted(int(m) for m in re.findall(r"checkpoint_step(\d{7})", open(snap).read()))


@pytest.fixture(scope="module")
def finished(ray_cluster, data_dir, tmp_path_factory):
    """12 steps, checkpoints at 4/8/12. After the step-4 checkpoint is registered the
    training worker's process is killed with SIGKILL (a real crash: no Python exception,
    no cleanup), and Ray Train restarts the worker group from that checkpoint."""
    from pipelines.train import train

    out = str(tmp_path_factory.mktemp("runs"))
    name = f"main-{int(time.time())}"
    cfg = _cfg(data_dir, out, name=name, max_steps=12)
    run_dir = os.path.join(out, name)
    result: dict = {}

    def run():
        try:
            result["summary"] = train(cfg, debug={"sleep_per_step": 0.4})
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 300
    while t.is_alive() and time.time() < deadline and "killed" not in result:
        time.sleep(0.1)
        if 4 in _registered_steps(run_dir):
            starts = [r for r in _rows(run_dir) if r.get("event") == "start"]
            result["registered_at_kill"] = max(_registered_steps(run_dir))
            os.kill(starts[0]["pid"], signal.SIGKILL)
            result["killed"] = starts[0]["pid"]
    t.join(timeout=600)
    if "error" in result:
        raise result["error"]
    assert "killed" in result, "the run ended before its worker could be killed"
    return cfg, {**result["summary"], "registered_at_kill": result["registered_at_kill"]}
def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_run_finishes_and_loss_decreases(finished):
    _, s = finished
    assert s["status"] == "finished" and s["step"] == 12
    train = [r for r in _rows(s["run_dir"]) if r["kind"] == "train"]
    assert train[0]["loss"] - train[-1]["loss"] > 0.5, [r["loss"] for r in train]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    val = [r for r in _rows(s["run_dir"]) if r["kind"] == "val"]
    assert [r["step"] for r in val][-1] == 12
    assert s["final_metrics"]["val_perplexity"] == pytest.approx(2.718281828 ** s["final_metrics"]["val_loss"], rel=1e-6)


def test_killed_worker_resumes_from_its_last_checkpoint(finished):
    _, s = finished
    # SIGKILL after the step-4 checkpoint: the restarted worker group resumes from the
    # latest checkpoint registered before the kill and still ends at the configured step.
    assert s["step"] == 12 and s["final_metrics"]["step"] == 12
    assert s["final_metrics"]["start_step"] == s["registered_at_kill"] >= 4
    events = [r for r in _rows(s["run_dir"]) if r["kind"] == "event"]
    starts = [e for e in events if e["event"] in ("start", "resume")]
    assert [e["event"] for e in starts] == ["start", "resume"]
    assert starts[0]["pid"] != starts[1]["pid"]  # a new worker process


def test_checkpoint_loads_with_plain_transformers(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhchat.checkpoints import resolve_checkpoint

    _, s = finished
    ckpt = s["best_checkpoint_path"]
    assert resolve_checkpoint(s["run_dir"]) == ckpt
    assert resolve_checkpoint(os.path.dirname(s["run_dir"])) == ckpt  # the runs folder: its last run
    assert resolve_checkpoint(ckpt) == ckpt
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert model.config.vocab_size == len(tok) and model.config.n_positions == 64
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
    ids = tok("你好", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
    assert {"optimizer", "scheduler", "step", "epoch", "batches_in_epoch", "rng"} <= set(state)


def test_run_folder_artifacts(finished):
    _, s = finished
    run = s["run_dir"]
    with open(s["loss_curve"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run, "tensorboard")))
    pointer = json.load(open(os.path.join(run, "latest.json")))
    assert pointer["best_checkpoint"].startswith("checkpoint_step") and pointer["status"] == "finished"
    # keep_last=2 best by val loss, plus the latest
    kept = sorted(n for n in os.listdir(run) if n.startswith("checkpoint_step"))
    assert 1 <= len(kept) <= 3 and "checkpoint_step0000012" in kept


def test_finished_run_is_reported_not_silently_skipped(finished, capsys):
    from pipelines.train import train

    cfg, s = finished
    t0 = time.perf_counter()
    again = train(cfg)
    assert again["already_finished"] is True and again["step"] == 12
    assert time.perf_counter() - t0 < 20  # decided before launching Ray Train


def _per_step_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(run_dir) if r["kind"] == "train"}


def test_two_worker_run_matches_one_worker_run(ray_cluster, data_dir, tmp_path):
    """Real DDP over gloo: 2 workers x 4 sequences and 1 worker x 8 take the same global
    batches (every worker reads one stream and takes its slice) and the same gradient (the
    loss is normalised by the global batch's loss tokens), so the loss of every step agrees.
    Tolerance: 1e-4 relative per step; only the order of float sums differs. The 2-worker
    run also checkpoints on time (every 0.6 s), which both ranks must agree on."""
    from pipelines.train import train

    out = str(tmp_path / "runs")
    common = dict(max_steps=8, log_every=1, checkpoint_every=8, torch_threads=1)
    one = train(_cfg(data_dir, out, name="one", **common))
    two = train(_cfg(data_dir, out, name="two", num_workers=2, checkpoint_every_minutes=0.01, **common),
                debug={"sleep_per_step": 0.3})
    a, b = _per_step_losses(one["run_dir"]), _per_step_losses(two["run_dir"])
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert a[1] - a[8] > 0.1  # it trained: equal losses are not two runs that did nothing
    assert one["final_metrics"]["tokens_seen"] == two["final_metrics"]["tokens_seen"]
    starts = [r for r in _rows(two["run_dir"]) if r.get("event") == "start"]
    assert starts[0]["world_size"] == 2 and starts[0]["per_worker_batch"] == 4
    timed = [r["step"] for r in _rows(two["run_dir"]) if r.get("event") == "checkpoint"]
    assert len(timed) >= 3 and any(s % 8 for s in timed), timed  # checkpoints between the step-based ones


def test_a_step_that_always_fails_is_not_retried_forever(ray_cluster, data_dir, tmp_path):
    """max_failures=-1 (retry forever) and a step that fails in every attempt: after 3
    attempts fail at that step the run ends with an error naming the step and the cause."""
    from pipelines.train import train

    cfg = _cfg(data_dir, str(tmp_path / "runs"), name="stuck", max_steps=6, checkpoint_every=2, max_failures=-1)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"step 3 failed in each of the last attempts \(RuntimeError: injected failure at step 3"):
        train(cfg, debug={"fail_always_at_step": 3})
    assert time.perf_counter() - t0 < 400


def test_global_batch_is_fixed_whatever_the_worker_count(data_dir, tmp_path):
    from zhchat.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by num_workers 3"):
        _cfg(data_dir, str(tmp_path), num_workers=3)
    # Elastic: every worker count of the range must split the global batch; the error names
    # the counts that do not and those that do (256 over 2..8 would silently become 255 or 252).
    with pytest.raises(ConfigError, match=r"not divisible by 3, 5, 6, 7 of the 2..8 workers.*that work: 2, 4, 8"):
        _cfg(data_dir, str(tmp_path), global_batch_size=256, num_workers=8, min_workers=2)
    assert _cfg(data_dir, str(tmp_path), global_batch_size=840, num_workers=8, min_workers=2).train.min_workers == 2


def _plain_pretrained(out: str):
    """A tiny 'pretrained' GPT-2 whose tokenizer lacks the dialogue tokens, as hub GPT-2 does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from conftest import SAMPLE_TEXTS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SAMPLE_TEXTS * 20, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=128)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(hf), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(out)
    hf.save_pretrained(out)
    return len(hf)


def test_init_from_with_another_vocab_fails_clearly(data_dir, tmp_path):
    from pipelines.train import train
    from pipelines.train.model import VocabMismatch

    pre = str(tmp_path / "pretrained")
    _plain_pretrained(pre)
    with pytest.raises(VocabMismatch, match="zhchat preprocess --tokenizer"):
        train(_cfg(data_dir, str(tmp_path / "runs"), init_from=pre, max_steps=2))


def test_init_from_pretrained_then_nan_stops_at_last_good_checkpoint(ray_cluster, tmp_path):
    """Fine-tunes a locally saved tiny GPT-2 (embeddings resized for the dialogue tokens);
    a NaN loss injected at step 3 stops the run, pointing at the step-2 checkpoint."""
    from transformers import AutoModelForCausalLM

    from pipelines.train import TrainingDiverged, train
    from zhchat.tokenizer import load_tokenizer

    pre = str(tmp_path / "pretrained")
    base_vocab = _plain_pretrained(pre)
    tok = load_tokenizer(pre)  # adds the 4 dialogue tokens, as preprocess --tokenizer does
    data = build_data_dir(str(tmp_path / "data"), n_dialogues=60, tokenizer=tok)
    cfg = _cfg(data, str(tmp_path / "runs"), name="ft", init_from=pre, max_steps=6, checkpoint_every=2,
               max_failures=0)
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint is .*checkpoint_step0000002"):
        train(cfg, debug={"nan_at_step": 3})
    run = os.path.join(str(tmp_path / "runs"), "ft")
    assert sorted(n for n in os.listdir(run) if n.startswith("checkpoint_step")) == ["checkpoint_step0000002"]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run, "checkpoint_step0000002"))
    assert model.config.vocab_size == base_vocab + 4 == len(tok)
    assert all(torch.isfinite(p).all() for p in model.parameters())
