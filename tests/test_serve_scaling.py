"""Slow: the model deployment scales 1 -> 2 replicas under load and back down, and a replica
killed under load is replaced, after which requests succeed again."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from conftest import free_port
from zhchat.config import GenerationDefaults, ServeConfig

pytestmark = pytest.mark.slow


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["ChatModel"]
    return status.replica_states.get("RUNNING", 0)


def wait_for(cond, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(1)
    raise TimeoutError(what)


class Load:
    """Closed-loop clients sending chat requests until stopped; counts outcomes."""

    def __init__(self, url: str, clients: int, max_tokens: int = 100):
        self.url, self.stop = url + "/v1/chat/completions", threading.Event()
        self.codes: dict[int, int] = {}
        self.body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": max_tokens,
                     "temperature": 1.5, "top_k": 0}
        # Every other client streams: streaming load must scale down too (Ray #61551).
        self.threads = [threading.Thread(target=self._run, args=(i % 2 == 1,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, stream: bool) -> None:
        with httpx.Client(timeout=120) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(self.url, json={**self.body, "stream": stream})
                    code = r.status_code
                    if stream and code == 200 and ('"error"' in r.text or not r.text.rstrip().endswith("[DONE]")):
                        code = -2  # an in-band error or a cut stream
                except httpx.HTTPError:
                    code = -1
                self.codes[code] = self.codes.get(code, 0) + 1

    def close(self) -> dict[int, int]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)
        return self.codes


def start(tiny_model_dir: str, name: str, **kw) -> str:
    from services import launch

    cfg = ServeConfig(model=tiny_model_dir, port=free_port(), ingress_cpus=0.1, replica_cpus=0.5,
                      generation=GenerationDefaults(max_tokens=16, max_tokens_cap=200), **kw)
    return launch.start(cfg, name=name, route_prefix=f"/{name}")


def test_autoscales_up_under_load_and_back_down(ray_cluster, tiny_model_dir):
    from ray import serve

    url = start(tiny_model_dir, "scale", min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                upscale_delay_s=1, downscale_delay_s=5, max_batch_size=4)
    try:
        assert running_replicas("scale") == 1
        load = Load(url, clients=6)
        wait_for(lambda: running_replicas("scale") == 2, 120, "scale up to 2 replicas")
        codes = load.close()
        assert set(codes) == {200}, codes
        wait_for(lambda: running_replicas("scale") == 1, 120, "scale back down to 1 replica")
        assert httpx.post(url + "/v1/chat/completions", json=load.body, timeout=60).status_code == 200
    finally:
        serve.delete("scale")


def test_killed_replica_is_replaced(ray_cluster, tiny_model_dir):
    import ray
    from ray import serve

    url = start(tiny_model_dir, "kill", min_replicas=1, max_replicas=1, health_check_period_s=2)
    try:
        before = httpx.get(url + "/metrics", timeout=30).json()["model_replica"]["actor"]
        load = Load(url, clients=3)
        time.sleep(3)
        ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
        time.sleep(3)
        wait_for(lambda: running_replicas("kill") == 1, 120, "a replacement replica")
        codes = load.close()
        # Requests in flight on the dead replica fail with 503 (retryable), or, for a stream
        # already under way, with an in-band error and [DONE]; never a hang or a 500.
        assert set(codes) <= {200, 503, -2}, codes
        after = httpx.get(url + "/metrics", timeout=30).json()["model_replica"]["actor"]
        assert after != before
        for _ in range(3):
            assert httpx.post(url + "/v1/chat/completions", json=load.body, timeout=60).status_code == 200
    finally:
        serve.delete("kill")


def test_replica_whose_engine_died_is_replaced(ray_cluster, tiny_model_dir):
    """Only the engine's child process dies (OOM killer, a segfault in a kernel): the replica
    actor is alive, but its requests fail fast with 503 + Retry-After and its health check
    fails, so Serve replaces it."""
    from ray import serve

    url = start(tiny_model_dir, "engine", min_replicas=1, max_replicas=1, health_check_period_s=2)
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8}
    try:
        info = httpx.get(url + "/metrics", timeout=30).json()["model_replica"]
        os.kill(info["engine_pid"], signal.SIGKILL)
        time.sleep(0.5)  # the replica's reader thread sees the socket close
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "engine_failed" and int(r.headers["Retry-After"]) >= 1

        def replaced() -> bool:
            try:
                m = httpx.get(url + "/metrics", timeout=10).json()["model_replica"]
            except (httpx.HTTPError, KeyError, ValueError):
                return False
            return m["actor"] != info["actor"] and running_replicas("engine") == 1

        wait_for(replaced, 120, "a replacement replica")
        new = httpx.get(url + "/metrics", timeout=30).json()["model_replica"]
        assert new["engine_pid"] != info["engine_pid"]
        for _ in range(3):
            assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    finally:
        serve.delete("engine")
