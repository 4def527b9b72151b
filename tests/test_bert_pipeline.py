"""A Chinese GPT-2 with a BERT-style tokenizer, as people have them (uer/gpt2-chinese-*,
GPT2-chitchat: BertTokenizerFast, a character vocabulary with [CLS]/[SEP]/[PAD]/[UNK]/[MASK]),
end to end: `zhchat preprocess --tokenizer DIR`, `zhchat train --init-from DIR`, eval,
`zhchat serve` and `zhchat chat`, with replies that read as normal Chinese everywhere.
The model and tokenizer are tiny and built here from the bundled sample; nothing is downloaded."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from test_bert_tokenizer import build_bert_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "zhchat", "data", "sample")
SPACED_HAN = re.compile(r"[\u4e00-\u9fff] [\u4e00-\u9fff]")  # "你 好": a BERT decode leaking through
BERT_TEXT = re.compile(r"\[(CLS|SEP|UNK|PAD|MASK)\]")


def _sample_text() -> list[str]:
    texts = []
    for path in glob.glob(os.path.join(SAMPLE, "*")):
        with open(path, encoding="utf-8", errors="ignore") as f:
            texts.append(f.read())
    return texts


def _pretrained_bert_gpt2(out: str) -> None:
    """A tiny 'pretrained' GPT-2 whose tokenizer is BERT-style, saved like a hub checkpoint."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_bert_tokenizer(out, texts=_sample_text())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(out)


def _reads_as_chinese(text: str) -> None:
    assert not SPACED_HAN.search(text), text
    assert not BERT_TEXT.search(text), text


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_bert_tokenizer_checkpoint_end_to_end(ray_cluster, tmp_path, capsys):
    from zhchat.cli import main

    pre = str(tmp_path / "pretrained")
    _pretrained_bert_gpt2(pre)
    work = tmp_path / "w"
    assert main(["ingest", SAMPLE, "--format", "auto", "--out", str(work / "ingest")]) == 0
    data = str(work / "data")
    assert main(["preprocess", "--in", str(work / "ingest"), "--out", data, "--tokenizer", pre,
                 "--context-length", "64"]) == 0
    # preprocess reports what the BERT vocabulary cannot represent
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    report = manifest["tokenizer"]["report"]
    assert report["texts"] > 0 and 0 <= report["unknown_rate"] < 0.5
    assert report["round_trip_changed"] > 0 and report["examples"]  # the sample has Latin capitals, emoji
    capsys.readouterr()

    runs = str(work / "runs")
    cfg = tmp_path / "small.yaml"
    cfg.write_text("train:\n  global_batch_size: 8\n  micro_batch_size: 8\n  torch_threads: 1\n"
                   "eval:\n  actors: 1\n  max_samples: 4\n  max_new_tokens: 12\n")
    assert main(["train", "--config", str(cfg), "--data", data, "--out", runs, "--init-from", pre,
                 "--max-steps", "4", "--name", "bert"]) == 0
    run = os.path.join(runs, "bert")
    capsys.readouterr()
    assert main(["eval", "--config", str(cfg), "--model", run, "--data", data, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ckpt = ev["model"]
    samples = json.load(open(os.path.join(ckpt, "eval_report.json")))["sample_dialogues"]
    assert samples and any(s["reply"] for s in samples)
    for s in samples:
        _reads_as_chinese(s["reply"])

    # zhchat serve: a reply over HTTP reads as Chinese too
    from ray import serve

    from services import launch
    from zhchat.config import GenerationDefaults, ServeConfig

    from conftest import free_port

    url = launch.start(ServeConfig(model=run, port=free_port(), replica_cpus=0.5, ingress_cpus=0.1, max_replicas=1,
                                   generation=GenerationDefaults(max_tokens=16)), name="bert", route_prefix="/bert")
    try:
        replies = []
        for seed in range(3):
            r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "你好，今天天气怎么样？"}], "temperature": 1.0, "seed": seed})
            assert r.status_code == 200, r.text
            replies.append(r.json()["choices"][0]["message"]["content"])
        assert any(replies)
        for text in replies:
            _reads_as_chinese(text)
    finally:
        serve.delete("bert")

    # zhchat chat in the terminal
    chat = subprocess.run([sys.executable, "-m", "zhchat.cli", "chat", "--model", run], input="你好\n/quit\n",
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert chat.returncode == 0, chat.stderr[-3000:]
    line = next(ln for ln in chat.stdout.splitlines() if "机器人:" in ln)
    _reads_as_chinese(line)
