"""`zhchat run` on the embedded default (bundled sample corpus), sized down for CI, and a
rerun that skips every finished stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from conftest import free_port, own_cluster_env
from test_shutdown import CRASH_MARKS
from zhchat.cli import main
from zhchat.run import sample_files

pytestmark = pytest.mark.slow


def test_sample_corpus_ships_in_several_formats():
    names = {Path(p).name for p in sample_files()}
    assert len(names) >= 5 and not any(n.endswith(".md") for n in names)


def test_run_embedded_default_end_to_end_then_skip(ray_cluster, tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    port = free_port()
    # Only sizes change: the inputs are the embedded default (no ingest inputs given).
    cfg.write_text(
        f"workdir: {tmp_path / 'w'}\n"
        "train: {preset: tiny, max_steps: 12, checkpoint_every: 6, global_batch_size: 8, micro_batch_size: 8,"
        " cpus_per_worker: 1}\n"
        "eval: {max_samples: 8, max_new_tokens: 8}\n"
        f"serve: {{port: {port}, max_replicas: 1}}\n",
        encoding="utf-8",
    )
    assert main(["run", str(cfg), "--no-serve"]) == 0
    w = tmp_path / "w"
    marks = {p.stem: json.loads(p.read_text()) for p in (w / ".stages").glob("*.json")}
    assert set(marks) == {"ingest", "preprocess", "train", "eval"}
    kept = pq.read_table(w / "ingest" / "dialogues").num_rows
    assert kept == marks["ingest"]["summary"]["totals"]["kept"] > 1000
    manifest = json.loads((w / "data" / "manifest.json").read_text())
    assert (w / "data" / "tokenizer" / "tokenizer.json").exists() and manifest
    report = marks["eval"]["summary"]
    for key in ("perplexity", "unigram_perplexity", "bleu2", "bleu4", "distinct1", "distinct2", "tokens"):
        assert key in report
    err = capsys.readouterr().err
    assert "loss curve" in err and "eval report" in err

    # A rerun with the same inputs and config does no work.
    assert main(["run", str(cfg), "--no-serve"]) == 0
    err = capsys.readouterr().err
    for stage in ("ingest", "preprocess", "train", "eval"):
        assert f"{stage}: outputs are complete" in err

    # Without --no-serve the run ends serving the trained model on 127.0.0.1 until SIGTERM
    # (a process of its own: it starts its own local cluster, as `zhchat run` does).
    proc = subprocess.Popen([sys.executable, "-m", "zhchat.cli", "run", str(cfg)], env=own_cluster_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 240
        while not any("serving at" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)[-4000:]
            assert time.monotonic() < deadline, "the chat server did not come up"
            time.sleep(1)
        assert httpx.get(base + "/healthz", timeout=10).status_code == 200
        r = httpx.post(base + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant", r.text
        assert httpx.get(base + "/", timeout=10).status_code == 200  # the chat page
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stop_s = time.monotonic() - t0
        reader.join(timeout=10)
        out = "".join(lines)
        assert proc.returncode == 0, out[-4000:]
        assert not [m for m in CRASH_MARKS if m in out], out[-4000:]  # no C++ stack, no abort
        # Serve's 30 s ingress drain (for multi-node HAProxy) is 2 s on a local cluster.
        assert stop_s < 25, f"stopping took {stop_s:.0f}s"
        assert "outputs are complete" in out and f"127.0.0.1:{port}" in out and "stopping" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_run_with_every_path_a_uri(ray_cluster, tmp_path, monkeypatch, capsys):
    """The same run with the workdir given as a file:// URI, so that every stage takes its
    cloud-storage path (pyarrow filesystems, Ray Data and Ray Train on a URI)
    against a real filesystem (S3 and GCS APIs on loopback: tests/test_cloud_storage.py).
    Nothing may land in a local folder named after the URI."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "bucket"
    cfg = tmp_path / "uri.yaml"
    cfg.write_text(
        f"workdir: {root.as_uri()}/w\n"
        "train: {preset: tiny, max_steps: 6, checkpoint_every: 6, global_batch_size: 8, micro_batch_size: 8,"
        " cpus_per_worker: 1}\n"
        "eval: {max_samples: 4, max_new_tokens: 4}\n",
        encoding="utf-8",
    )
    assert main(["run", str(cfg), "--no-serve"]) == 0
    assert not (tmp_path / "file:").exists()
    w = root / "w"
    assert {p.stem for p in (w / ".stages").glob("*.json")} == {"ingest", "preprocess", "train", "eval"}
    assert (w / "data" / "tokenizer" / "tokenizer.json").exists()
    assert list((w / "data" / "tokens" / "train").glob("*.parquet"))
    assert list(w.glob("train/*/loss_curve.png")) and list(w.glob("train/*/checkpoint_*/eval_report.json"))
    err = capsys.readouterr().err
    assert "eval report: " in err and "file://" in err
    assert main(["run", str(cfg), "--no-serve"]) == 0
    assert capsys.readouterr().err.count("outputs are complete") == 4
