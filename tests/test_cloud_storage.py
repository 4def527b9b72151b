"""`zhchat run` with its workdir in object storage: a real S3 API (moto's server) and a real
GCS JSON API (gcp-storage-emulator) on 127.0.0.1, reached through the clients a cluster uses
(pyarrow's S3FileSystem/GcsFileSystem, which Ray Data, Ray Train and zhchat.storage all use).
The config names plain s3:// and gs:// URIs, as it would on a cluster; only the environment
differs from the clouds, through variables each client honours:
- S3: AWS_ENDPOINT_URL, test keys.
- GCS: CLOUD_STORAGE_EMULATOR_ENDPOINT (pyarrow's GCS client); pyarrow still asks Google's
  OAuth endpoint for a token, which cannot run here, so the test serves one on loopback and
  points application-default credentials at it.
The run is a subprocess that starts its own local Ray cluster, so every Ray worker inherits
the environment."""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import own_cluster_env

pytestmark = pytest.mark.slow

BUCKET = "zhchat-test-bucket"


class Store:
    """An object store on loopback: the env a run needs, and its keys and bytes as the store has them."""

    def __init__(self, scheme, env, keys, get, put):
        self.scheme, self.env, self.keys, self.get, self.put = scheme, env, keys, get, put


def _s3():
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                          aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)

    def keys():
        return {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for o in page.get("Contents", [])}

    def get(key):
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def put(key, data):
        client.put_object(Bucket=BUCKET, Key=key, Body=data)

    return Store("s3", env, keys, get, put), server.stop


class _TokenHandler(BaseHTTPRequestHandler):
    """Google's OAuth token endpoint, as far as a refresh-token grant needs it."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"access_token": "test-token", "expires_in": 3600, "token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _gcs(tmp_path):
    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # The emulator's own server answers one request at a time, and pyarrow's parallel
    # downloads then deadlock it (it blocks writing one body while the client waits on
    # another connection), so its handler runs behind a threading server here. Its
    # Storage is not thread-safe (a delete serialised the metadata while another request
    # changed it, answered 500, and the client's retry then got 404), so every Storage
    # call holds one lock; bodies are still sent outside it, so the deadlock stays away.
    lock = threading.RLock()

    def locked(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)
        return call

    calls = {n: locked(f) for n, f in vars(Storage).items() if inspect.isfunction(f) and not n.startswith("__")}
    objects = type("LockedStorage", (Storage,), calls)(use_memory_fs=True)
    buckets.create_bucket(BUCKET, objects)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RequestHandler, objects))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    token = ThreadingHTTPServer(("127.0.0.1", 0), _TokenHandler)
    threading.Thread(target=token.serve_forever, daemon=True).start()
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "test", "client_secret": "test",
                               "refresh_token": "test",
                               "token_uri": f"http://127.0.0.1:{token.server_address[1]}/token"}))
    endpoint = f"http://127.0.0.1:{port}"
    env = {"CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint, "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
           "GOOGLE_CLOUD_PROJECT": "test"}
    client = storage.Client(project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    bucket = client.bucket(BUCKET)

    def keys():
        return {b.name for b in client.list_blobs(BUCKET)}

    def get(key):
        return bucket.blob(key).download_as_bytes()

    def put(key, data):
        bucket.blob(key).upload_from_string(data)

    def stop():
        token.shutdown()
        server.shutdown()

    return Store("gs", env, keys, get, put), stop


@pytest.fixture(params=["s3", "gs"])
def store(request, tmp_path):
    s, stop = _s3() if request.param == "s3" else _gcs(tmp_path)
    yield s
    stop()


def _run(cfg, store):
    return subprocess.run([sys.executable, "-m", "zhchat.cli", "run", str(cfg), "--no-serve"],
                          env=own_cluster_env(**store.env), cwd=cfg.parent, capture_output=True, text=True,
                          timeout=900)


def test_run_with_workdir_in_object_storage(store, tmp_path):
    # The inputs live in the store too: the bundled samples in a folder (the Douban one
    # gzipped), a hidden file that ingest must skip, and a JSON-lines file over chunk_mb that
    # is cut into two byte ranges, the second read from its offset by a ranged request.
    from zhchat.run import sample_files

    def stored_name(path):
        name = os.path.basename(path)
        return f"{name}.gz" if name.startswith("douban") else name

    for path in sample_files():
        data = open(path, "rb").read()
        store.put(f"in/{stored_name(path)}", gzip.compress(data) if stored_name(path).endswith(".gz") else data)
    lccc = [p for p in sample_files() if p.endswith("lccc_sample.jsonl")][0]
    lines = open(lccc, "rb").read()
    big = lines * (((1 << 20) // len(lines)) + 1)  # just over 1 MiB
    store.put("in/more/lccc_big.jsonl", big)
    store.put("in/.hidden/notes.txt", b"not a corpus")
    cfg = tmp_path / "cloud.yaml"
    cfg.write_text(
        f"workdir: {store.scheme}://{BUCKET}/w\n"
        f"ingest: {{inputs: ['{store.scheme}://{BUCKET}/in'], chunk_mb: 1}}\n"
        "ray: {num_cpus: 2}\n"
        "train: {preset: tiny, max_steps: 6, checkpoint_every: 6, global_batch_size: 8, micro_batch_size: 8,"
        " cpus_per_worker: 1}\n"
        "eval: {max_samples: 4, max_new_tokens: 4}\n",
        encoding="utf-8",
    )
    r = _run(cfg, store)
    assert r.returncode == 0, r.stderr[-4000:]
    keys = store.keys()
    for stage in ("ingest", "preprocess", "train", "eval"):
        assert f"w/.stages/{stage}.json" in keys
    assert "w/data/tokenizer/tokenizer.json" in keys and "w/data/manifest.json" in keys
    assert any(k.startswith("w/ingest/dialogues/") and k.endswith(".parquet") for k in keys)
    ingest = json.loads(store.get("w/ingest/summary.json"))
    assert sorted(ingest["files"]) == sorted(
        [f"{store.scheme}://{BUCKET}/in/{stored_name(p)}" for p in sample_files()]
        + [f"{store.scheme}://{BUCKET}/in/more/lccc_big.jsonl"])
    split = ingest["files"][f"{store.scheme}://{BUCKET}/in/more/lccc_big.jsonl"]
    assert split["chunks"] == 2 and split["read"] == big.count(b"\n")
    whole = ingest["files"][f"{store.scheme}://{BUCKET}/in/lccc_sample.jsonl"]
    assert split["kept"] == whole["kept"] * (len(big) // len(lines))
    assert ingest["totals"]["kept"] > 0 and ingest["totals"]["read"] == sum(f["read"] for f in ingest["files"].values())
    assert any(k.startswith("w/data/tokens/train/") and k.endswith(".parquet") for k in keys)
    ckpt = [k for k in keys if k.endswith("/model.safetensors")]
    assert ckpt and any(k.endswith("/loss_curve.png") for k in keys)
    report = json.loads(store.get(ckpt[0].rsplit("/", 1)[0] + "/eval_report.json"))
    assert report["tokens"] > 0 and report["perplexity"] > 1
    assert f"{store.scheme}://" in r.stderr
    assert not any(p.name.startswith(f"{store.scheme}:") for p in tmp_path.iterdir())

    # Rerun: every stage sees its complete outputs in the store and skips.
    r = _run(cfg, store)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("outputs are complete") == 4


def test_storage_helpers_copy_and_list_a_store(store, tmp_path, monkeypatch):
    """zhchat.storage's local copy (file, folder, cached destination) and folder listing,
    in this process, against the same store."""
    from zhchat import storage
    from zhchat.checkpoints import local_checkpoint

    for k, v in store.env.items():
        monkeypatch.setenv(k, v)
    store.put("h/run/checkpoint_000002/config.json", b"{}")
    store.put("h/run/checkpoint_000002/model.safetensors", b"weights")
    store.put("h/run/checkpoint_000010/config.json", b"{}")
    store.put("h/run/metrics.jsonl", b'{"step": 1}\n')
    run = f"{store.scheme}://{BUCKET}/h/run"
    assert storage.list_dirs(run) == ["checkpoint_000002", "checkpoint_000010"]
    assert storage.list_dirs(f"{run}/missing") == []

    got = storage.local_copy(f"{run}/metrics.jsonl", str(tmp_path / "m" / "metrics.jsonl"))
    assert open(got, "rb").read() == b'{"step": 1}\n' and not os.path.exists(got + ".part")
    folder = storage.local_copy(f"{run}/checkpoint_000002")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]

    # A cloud checkpoint is downloaded once, then served from its cache (the newest one,
    # found by listing the run, since no latest.json points anywhere).
    ckpt = local_checkpoint(run, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(ckpt) == ["config.json"]
    store.put("h/run/checkpoint_000010/extra.txt", b"later")
    assert local_checkpoint(run, cache_dir=str(tmp_path / "cache")) == ckpt
    assert os.listdir(ckpt) == ["config.json"]
