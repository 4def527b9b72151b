"""`zhchat eval`: metric functions against hand-computed values, then the stage end to end
(Ray Data actors scoring and generating with a tiny real GPT-2) through the CLI with --json."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from test_train_data import build_data_dir


def test_perplexity_is_token_weighted_not_a_mean_of_examples():
    from pipelines.evaluate import perplexity

    # two examples: NLL sums 2.0 over 1 token and 4.0 over 3 tokens
    assert perplexity(6.0, 4) == pytest.approx(math.exp(1.5))
    assert perplexity(6.0, 4) != pytest.approx((math.exp(2.0) + math.exp(4 / 3)) / 2)
    with pytest.raises(ValueError, match="no loss tokens"):
        perplexity(0.0, 0)


def test_score_batch_matches_a_hand_computed_nll(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import score_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = [np.array([0, 7, 8, 9, 4]), np.array([0, 5, 6])]
    labels = [np.array([-100, -100, 8, 9, 4]), np.array([-100, 5, 6])]
    out = score_batch(model, {"input_ids": np.array(ids, dtype=object), "labels": np.array(labels, dtype=object)}, 0)
    assert out["tokens"].tolist() == [3, 2]
    for row, (x, y) in enumerate(zip(ids, labels)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.from_numpy(x)[None]).logits[0].double(), -1)  # [T, V]
        # position t predicts token t+1; only labelled targets count
        hand = -sum(logp[t, y[t + 1]].item() for t in range(len(x) - 1) if y[t + 1] != -100)
        assert out["nll"][row] == pytest.approx(hand, rel=1e-4)


def test_unigram_baseline_by_hand():
    from pipelines.evaluate import label_counts, unigram_perplexity

    train = label_counts({"labels": [np.array([-100, 0, 0, 1]), np.array([2, 0, -100])]}, 3)["counts"][0]
    assert train.tolist() == [3, 1, 0]  # position 0 is never a target; -100 is skipped
    test = np.array([1, 0, 1])           # test tokens: one 0 and one 2
    # add-one: p = [4/7, 2/7, 1/7]; ppl = exp(-(log 4/7 + log 1/7) / 2) = 7/2
    assert unigram_perplexity(train, test) == pytest.approx(3.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        label_counts({"labels": [np.array([-100, 5])]}, 3)


def test_reply_metrics_by_hand():
    from pipelines.evaluate import distinct_n, repetition_rate, reply_metrics, reply_samples

    assert distinct_n([list("哈哈哈"), list("你好")], 1) == pytest.approx(3 / 5)
    assert distinct_n([list("哈哈哈"), list("你好")], 2) == pytest.approx(2 / 3)
    assert repetition_rate(["好的好的好的", "你好呀", "我们我们"]) == pytest.approx(1 / 3)
    m = reply_metrics(["今天天气很好", "我喜欢看电影"], ["今天天气很好", "我喜欢看电影"])
    assert m["bleu2"] == pytest.approx(100) and m["bleu4"] == pytest.approx(100)
    assert m["bleu4_words"] == pytest.approx(100) and m["avg_length"] == 6
    low = reply_metrics(["完全不同的话"], ["今天天气很好"])
    assert low["bleu4"] < 1
    samples, skipped = reply_samples([{"turns": ["a"]}, {"turns": ["u1", "a1", "u2", "a2"], "system": ""}], 5)
    assert skipped == 1 and samples[0]["context"] == ["u1", "a1", "u2"] and samples[0]["reference"] == "a2"


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """DATA folder plus a run folder whose latest.json points at a tiny GPT-2 checkpoint."""
    from transformers import AutoTokenizer

    from conftest import build_tiny_model

    root = tmp_path_factory.mktemp("eval")
    data = build_data_dir(str(root / "data"), n_dialogues=80)
    run = root / "runs" / "r1"
    ckpt = run / "checkpoint_step0000001"
    build_tiny_model(str(ckpt), AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer")), n_positions=64)
    (run / "latest.json").write_text(json.dumps({"status": "finished", "best_checkpoint": ckpt.name}))
    cfg = root / "eval.yaml"
    cfg.write_text("eval:\n  actors: 1\n  max_samples: 6\n  max_new_tokens: 8\n  show_samples: 3\n")
    return data, str(run), str(ckpt), str(cfg)


def test_eval_cli_json_report(ray_cluster, eval_setup, capsys):
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import score_batch
    from zhchat.cli import main

    data, run, ckpt, cfg = eval_setup
    assert main(["eval", "--config", cfg, "--model", run, "--data", data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("perplexity", "unigram_perplexity", "bleu2", "bleu4", "distinct1", "distinct2", "tokens",
                "bleu2_words", "bleu4_words", "avg_length", "repetition_rate", "samples"):
        assert isinstance(report[key], (int, float)), key
    assert report["model"] == ckpt and report["samples"] == 6
    # The Ray path sums to what one process computes over the same test split.
    import pyarrow.dataset as pads

    table = pads.dataset(os.path.join(data, "tokens", "test"), format="parquet").to_table()
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    out = score_batch(model, {k: np.array([np.array(v) for v in table.column(k).to_pylist()], dtype=object)
                              for k in ("input_ids", "labels")}, 0)
    assert report["tokens"] == int(out["tokens"].sum())
    assert report["perplexity"] == pytest.approx(math.exp(out["nll"].sum() / out["tokens"].sum()), rel=1e-4)
    # an untrained model is near uniform: worse than the unigram baseline
    assert report["perplexity"] > report["unigram_perplexity"]
    saved = json.load(open(os.path.join(ckpt, "eval_report.json")))
    assert saved["perplexity"] == report["perplexity"] and len(saved["sample_dialogues"]) == 3
    md = open(os.path.join(ckpt, "eval_report.md"), encoding="utf-8").read()
    assert "| perplexity |" in md and "模型回复" in md
    # Multi-turn evaluation: every reply lands in one turn bucket; the PNG sits beside the report.
    by_turn = saved["by_turn"]
    assert list(by_turn["buckets"]) == ["1", "2", "3", "4+"]
    assert sum(b["count"] for b in by_turn["buckets"].values()) == by_turn["all"]["count"] == 6
    assert 0 <= report["self_repetition"] <= 1 and 0 <= report["self_repetition_reference"] <= 1
    assert report["turn_metrics_png"] == os.path.join(ckpt, "turn_metrics.png")
    assert open(report["turn_metrics_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "## By turn" in md and "![metrics by turn](turn_metrics.png)" in md


def test_eval_refuses_a_model_with_another_vocabulary(ray_cluster, eval_setup, tmp_path):
    from transformers import AutoTokenizer

    from conftest import build_tiny_model, build_tiny_tokenizer
    from pipelines.evaluate import evaluate
    from zhchat.config import load_config

    data, *_ = eval_setup
    other = build_tiny_tokenizer(str(tmp_path / "tok"), vocab_size=400)
    build_tiny_model(str(tmp_path / "m"), AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    assert len(other) != len(AutoTokenizer.from_pretrained(os.path.join(data, "tokenizer")))
    with pytest.raises(ValueError, match="another tokenizer"):
        evaluate(load_config(None, {"eval": {"model": str(tmp_path / "m"), "data": data}}).resolved())
