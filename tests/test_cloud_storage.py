"""`zhchat run` with its workdir on S3: a real S3 API (moto's server) on 127.0.0.1, reached
through the same clients a cluster uses (pyarrow's S3FileSystem for Ray Data and Ray
Train, s3fs for fsspec). Only the endpoint differs from AWS: AWS_ENDPOINT_URL, which both
honour. The run is a subprocess that starts its own local Ray cluster, so that every Ray
worker inherits the endpoint and the test credentials."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

BUCKET = "zhchat-test-bucket"


@pytest.fixture
def s3_env():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield env, client
    server.stop()


def _run(cfg, env):
    return subprocess.run([sys.executable, "-m", "zhchat.cli", "run", str(cfg), "--no-serve"], env=env,
                          cwd=cfg.parent, capture_output=True, text=True, timeout=900)


def test_run_with_workdir_on_s3(s3_env, tmp_path):
    env, client = s3_env
    cfg = tmp_path / "s3.yaml"
    cfg.write_text(
        f"workdir: s3://{BUCKET}/w\n"
        "ray: {num_cpus: 2}\n"
        "train: {preset: tiny, max_steps: 6, checkpoint_every: 6, global_batch_size: 8, micro_batch_size: 8,"
        " cpus_per_worker: 1}\n"
        "eval: {max_samples: 4, max_new_tokens: 4}\n",
        encoding="utf-8",
    )
    r = _run(cfg, env)
    assert r.returncode == 0, r.stderr[-4000:]
    keys = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])}
    for stage in ("ingest", "preprocess", "train", "eval"):
        assert f"w/.stages/{stage}.json" in keys
    assert "w/data/tokenizer/tokenizer.json" in keys and "w/data/manifest.json" in keys
    assert any(k.startswith("w/ingest/dialogues/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith("w/data/tokens/train/") and k.endswith(".parquet") for k in keys)
    ckpt = [k for k in keys if k.endswith("/model.safetensors")]
    assert ckpt and any(k.endswith("/loss_curve.png") for k in keys)
    report = json.loads(client.get_object(Bucket=BUCKET, Key=ckpt[0].rsplit("/", 1)[0] + "/eval_report.json")["Body"].read())
    assert report["tokens"] > 0 and report["perplexity"] > 1
    assert "s3://" in r.stderr and not any(p.name.startswith("s3:") for p in tmp_path.iterdir())

    # Rerun: every stage sees its complete outputs on S3 and skips.
    r = _run(cfg, env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("outputs are complete") == 4
