"""`zhchat train` end to end on the session Ray cluster with the tiny preset.

One run (with an injected worker failure that Ray Train recovers from) serves most tests;
a second fine-tunes a tiny pretrained GPT-2 and then hits an injected NaN loss.
The failure and the NaN are injected through LoopConfig.debug hooks, because a real
worker crash or a real divergence cannot be produced on demand.
"""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def finished(ray_cluster, data_dir, tmp_path_factory):
    """12 steps, checkpoints at 4/8/12; the worker dies after step 6 and Ray restarts it."""
    from pipelines.train import train

    out = str(tmp_path_factory.mktemp("runs"))
    cfg = _cfg(data_dir, out, name=f"main-{int(time.time())}", max_steps=12)
    summary = train(cfg, debug={"fail_at_step": 6})
    return cfg, summary


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


def test_worker_failure_resumes_from_checkpoint(finished):
    _, s = finished
    # The injected failure after step 6 restarts the worker group from the step-4 checkpoint.
    assert s["final_metrics"]["start_step"] == 4
    events = [r["event"] for r in _rows(s["run_dir"]) if r["kind"] == "event"]
    assert events.count("start") == 1 and events.count("resume") == 1


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
    assert {"optimizer", "scheduler", "step", "epoch", "step_in_epoch", "rng"} <= set(state)


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


def test_gradient_accumulation_is_the_same_for_1_and_2_workers():
    """One worker with 2 micro-batches vs two workers (DDP averages their gradients) with 1 each."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipelines.train.data import collate, count_targets, micro_batches
    from pipelines.train.step import accumulate_gradients

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                       resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50, size=n) for n in (5, 9, 7, 12)]
    labels = [np.where(rng.random(len(r)) < 0.3, -100, r) for r in rows]
    batch = collate({"input_ids": np.array(rows, dtype=object), "labels": np.array(labels, dtype=object)}, 0)
    n = count_targets(batch["labels"])

    def grads(chunks_per_worker):
        world = len(chunks_per_worker)
        total = [torch.zeros_like(p) for p in model.parameters()]
        for chunks in chunks_per_worker:
            model.zero_grad()
            accumulate_gradients(model, chunks, n, world, "cpu")
            for t, p in zip(total, model.parameters()):
                t += p.grad / world  # what DDP's all-reduce mean does
        return total

    one = grads([micro_batches(batch, 2)])
    half = lambda s: {k: v[s] for k, v in batch.items()}  # noqa: E731
    two = grads([micro_batches(half(slice(0, 2)), 2), micro_batches(half(slice(2, 4)), 2)])
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_global_batch_is_fixed_whatever_the_worker_count(data_dir, tmp_path):
    from zhchat.config import ConfigError

    with pytest.raises(ConfigError, match="not divisible by num_workers 3"):
        _cfg(data_dir, str(tmp_path), num_workers=3)


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
