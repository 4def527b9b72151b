"""`zhchat submit`: run the pipeline (or one stage) as a Ray job on a cluster.

Uses Ray's job SDK with the project folder as the job's working directory, so the
cluster runs exactly this code. The resolved config travels with it; relative local
paths are made absolute (on a multi-node cluster use shared storage or s3:// / gs://).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import yaml

from .config import RunConfig, is_uri
from .report import say

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXCLUDES = [".git", "zhchat-run", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/out", "**/*.parquet",
            "**/*.safetensors", ".venv"]
AGENT_WAIT_S = 60.0
PATH_FIELDS = {"workdir": None, "ingest": ("out",), "crawl": ("out",), "preprocess": ("in", "out"),
               "train": ("data", "out"), "eval": ("model", "data"), "serve": ("model",)}


def _absolute(p: str | None) -> str | None:
    return p if p is None or is_uri(p) else os.path.abspath(os.path.expanduser(p))


def job_config(cfg: RunConfig) -> dict:
    """The config as the job will see it: every local path absolute."""
    data = cfg.model_dump(mode="json", by_alias=True)
    data["workdir"] = _absolute(data["workdir"])
    data["ingest"]["inputs"] = [_absolute(p) for p in data["ingest"]["inputs"]]
    for section, keys in PATH_FIELDS.items():
        for k in keys or ():
            data[section][k] = _absolute(data[section][k])
    data["ray"]["address"] = None  # inside the job, Ray is already the cluster
    return data


def use_token_auth_if_present() -> None:
    """Ray 2.60 turns token auth on for local clusters and writes ~/.ray/auth_token; a job
    client must then send it. Do what `ray` itself does for a client: use the token if one
    exists and the user has not chosen a mode. Never switch authentication off."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    try:  # Ray's own helper also refreshes its cached config in this process
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:
        if (Path.home() / ".ray" / "auth_token").exists():
            os.environ["RAY_AUTH_MODE"] = "token"


def submit(cfg: RunConfig, stage: str, address: str, follow: bool = False, working_dir: Path = PROJECT_ROOT,
           extra_env: dict[str, str] | None = None) -> str:
    from ray.job_submission import JobSubmissionClient

    use_token_auth_if_present()
    client = JobSubmissionClient(address)
    config_yaml = yaml.safe_dump(job_config(cfg), allow_unicode=True, sort_keys=False)
    entry = f"python -m zhchat.cli {stage} --config env://ZHCHAT_JOB_CONFIG"
    if stage == "run":
        entry += " --no-serve"  # a batch job ends; serve with a RayService or `zhchat serve`
    job_id = _submit_when_agent_ready(
        client,
        entrypoint=entry,
        runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES,
                     "env_vars": {"ZHCHAT_JOB_CONFIG": config_yaml, "TOKENIZERS_PARALLELISM": "false",
                                  **(extra_env or {})}},
        metadata={"zhchat_stage": stage},
    )
    say(f"submitted job [bold]{job_id}[/] to {address}: {entry}")
    if follow:
        asyncio.run(_follow(client, job_id))
    return job_id


def _submit_when_agent_ready(client, wait_s: float = AGENT_WAIT_S, **job) -> str:
    """A head that has just started answers HTTP before its job agent has registered and
    says "No available agent to submit job" (a 500) for a few seconds; wait that out
    instead of failing, and fail on anything else at once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            say("the cluster's job agent is not ready yet; retrying")
            time.sleep(2)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
    say(f"job {job_id}: {client.get_job_status(job_id)}")


def run_submit(cfg: RunConfig, args: argparse.Namespace) -> dict:
    address = args.address or os.environ.get("RAY_ADDRESS") or cfg.ray.address or "http://127.0.0.1:8265"
    if not address.startswith(("http://", "https://")):
        # The job server is the dashboard's HTTP port, not the GCS port.
        raise ValueError(f"--address must be the job server's http(s):// address (dashboard port), got {address!r}")
    job_id = submit(cfg, args.stage, address, follow=args.follow)
    return {"job_id": job_id, "address": address}
