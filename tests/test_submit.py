"""`zhchat submit` against a real head node started with `ray start --head` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from zhchat.config import load_config
from zhchat.runtime import unused_ports
from zhchat.submit import job_config, submit

pytestmark = pytest.mark.slow


def _start_head(tmpdir):
    """One `ray start --head` with ports of its own; its output goes to a log the failure shows."""
    temp = tmpdir / "ray"
    # Ports outside the ephemeral range, where the suite's own Ray processes keep binding
    # theirs (a port free now could be taken before the head binds it, and `ray start` exits).
    gcs, dash, *agent = unused_ports(7)
    # The job agent listens on a fixed default port (52365), which the suite's own Ray cluster
    # already holds: without ports of its own this head's agent never comes up and every
    # submission gets "No available agent to submit job". The client server's default
    # (10001) is taken by any other head on the machine.
    names = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port"]
    ports = [f"--{name}={port}" for name, port in zip(names, agent)]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    with open(tmpdir / "ray-start.log", "ab") as log:  # the child keeps its own descriptor
        # --block keeps `ray start` in the foreground so the whole head can be stopped by its
        # process group (never `ray stop`: it would stop every Ray cluster on the machine).
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
             "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}",
             *ports],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
    return proc, gcs, f"http://127.0.0.1:{dash}"


def _head_is_up(proc, address, temp, timeout_s: float) -> bool:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            # 401 is an answer too: with ~/.ray/auth_token present (any earlier ray.init()
            # writes it) the head starts with token authentication on.
            # `ray start` records the cluster (ray_current_cluster) after the dashboard is up.
            if (httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401)
                    and (temp / "ray_current_cluster").exists()):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return False


def _stop_head(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def head_node():
    # RAY_TMPDIR/ray is where `ray start` records the cluster (ray_current_cluster): a
    # child with RAY_TMPDIR set finds it as a command on a cluster node finds /tmp/ray.
    # A short folder, not pytest's: the head's Unix sockets live under
    # <temp>/session_<date>_<pid>/sockets/, and from pytest's tmp folder (pytest-NNN once a
    # machine has run the suite often) dash_TrainHead's path passed AF_UNIX's 107 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="zh", dir="/tmp"))
    for _attempt in range(3):  # a head that exits at once (a port taken meanwhile) gets new ports
        proc, gcs, address = _start_head(tmpdir)
        if _head_is_up(proc, address, tmpdir / "ray", 180):
            break
        _stop_head(proc)
    else:
        log = (tmpdir / "ray-start.log").read_text(errors="replace")
        pytest.fail(f"head node did not start in 3 attempts; ray start printed:\n{log[-4000:]}")
    yield address, {"RAY_TMPDIR": str(tmpdir), "gcs": f"127.0.0.1:{gcs}"}
    _stop_head(proc)
    shutil.rmtree(tmpdir, ignore_errors=True)


def test_job_config_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"workdir": "rel", "train": {"out": "s3://bucket/run"}}).resolved()
    data = job_config(cfg)
    assert data["workdir"] == str(tmp_path / "rel")
    assert data["preprocess"]["in"] == str(tmp_path / "rel" / "ingest")
    assert data["train"]["out"] == "s3://bucket/run"  # URIs untouched
    assert data["ray"]["address"] is None


class _AgentNotReadyThen:
    """Stands in for the job client only to drive the retry rule; the real head is below."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls = failures, message, 0

    def submit_job(self, **job):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"Request failed with status code 500: {self.message}.")
        return "raysubmit_ok"


def test_submit_waits_for_the_job_agent_but_not_for_other_errors(monkeypatch):
    from zhchat import submit as submit_mod

    monkeypatch.setattr(submit_mod.time, "sleep", lambda s: None)
    client = _AgentNotReadyThen(2, "No available agent to submit job, please try again later")
    assert submit_mod._submit_when_agent_ready(client, entrypoint="x") == "raysubmit_ok"
    assert client.calls == 3
    other = _AgentNotReadyThen(1, "Runtime env setup failed")
    with pytest.raises(RuntimeError, match="Runtime env"):
        submit_mod._submit_when_agent_ready(other, entrypoint="x")
    assert other.calls == 1
    stuck = _AgentNotReadyThen(10**6, "No available agent to submit job")
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_mod._submit_when_agent_ready(stuck, wait_s=0.0, entrypoint="x")


def test_a_command_on_a_cluster_machine_joins_the_cluster(head_node, tmp_path):
    """With no address given, zhchat joins the cluster `ray start` made this machine part of
    (a GPU node's command must see the cluster's GPUs, not start a private cluster), and
    starts its own where the recorded cluster is gone."""
    _, where = head_node
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = where["RAY_TMPDIR"]
    if os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        env["RAY_AUTH_MODE"] = "token"  # the head started with token authentication on
    code = ("from zhchat.config import RayConfig; from zhchat.runtime import init_ray; import ray; "
            "init_ray(RayConfig(include_dashboard=False, num_cpus=1)); print('GCS', ray.get_runtime_context().gcs_address)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    # The head records its address with the node's own IP, whatever --node-ip-address says.
    assert re.search(rf"GCS \S+:{where['gcs'].split(':')[1]}\n", out.stdout), out.stdout[-2000:] + out.stderr[-3000:]

    stale = tmp_path / "ray"
    stale.mkdir()
    (stale / "ray_current_cluster").write_text("127.0.0.1:1")  # a cluster that is gone
    env["RAY_TMPDIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", "from zhchat.runtime import running_cluster_address as r; print('ADDR', r())"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert "ADDR None" in out.stdout, out.stdout + out.stderr


def test_submit_ingest_job_runs_on_head(head_node, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    src = tmp_path / "chat.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}]}\n'
                   "not json\n", encoding="utf-8")
    cfg = load_config(None, {"workdir": str(tmp_path / "w"), "ingest": {"inputs": [str(src)]}}).resolved()
    address, _ = head_node
    job_id = submit(cfg, "ingest", address)
    client = JobSubmissionClient(address)
    deadline = time.time() + 300
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    rows = pq.read_table(str(tmp_path / "w" / "ingest" / "dialogues")).to_pylist()
    assert [r["turns"] for r in rows] == [["你好", "你好呀"]]
    bad = pq.read_table(str(tmp_path / "w" / "ingest" / "quarantine")).to_pylist()
    assert len(bad) == 1 and bad[0]["line"] == 2
