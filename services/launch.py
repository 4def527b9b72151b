"""`zhchat serve`: start the Serve app on a Ray cluster and keep it up until Ctrl-C/SIGTERM.

`start()` is the non-blocking variant (used by `zhchat run` and the tests): it returns the
base URL once the app is running.
"""

from __future__ import annotations

import signal
import threading

from zhchat.config import RunConfig, ServeConfig
from zhchat.report import kv_table, say
from zhchat.runtime import init_ray

APP_NAME = "zhchat"


def ensure_serve(host: str, port: int) -> int:
    """Start Serve's HTTP proxy on host:port unless Serve already runs; the port in use."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": host, "port": port})
    return _get_global_client().http_config.port


def start(cfg: RunConfig | ServeConfig, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the app (ingress + model) and return its base URL, without blocking."""
    from ray import serve

    from services.app import app_from_config

    serve_cfg = cfg.serve if isinstance(cfg, RunConfig) else cfg
    if isinstance(cfg, RunConfig):
        init_ray(cfg.ray)
    else:
        init_ray()
    if not serve_cfg.model:
        raise ValueError("no model to serve: pass --model DIR or set serve.model")
    port = ensure_serve(serve_cfg.host, serve_cfg.port)
    serve.run(app_from_config(serve_cfg), name=name, route_prefix=route_prefix, blocking=False)
    host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def stop(name: str = APP_NAME, wait_s: float | None = None) -> None:
    """Delete the app. With wait_s, wait at most that long: a blocking delete was seen to
    hang after SIGTERM, which left `zhchat serve` running after "stopping"."""
    from ray import serve

    if wait_s is None:
        serve.delete(name)
        return
    import time

    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and name in serve.status().applications:
        time.sleep(0.5)


def run_serve(cfg: RunConfig, args=None) -> dict:
    """Serve until interrupted (SIGINT or SIGTERM), then remove the app: requests in flight
    finish first (Serve drains a deleted app's replicas), new ones are refused."""
    done = threading.Event()
    url = None

    def on_signal(*_) -> None:
        if url is None:  # still starting (which may wait for resources): give up, as Ctrl-C does
            raise KeyboardInterrupt
        done.set()

    def handle_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    # `serve run`-style scripts can be started in the background where SIGINT is ignored:
    # SIGTERM must stop us too, and from the start. ray.init() installs its own SIGTERM
    # handler (sys.exit wherever the main thread is: a C++ stack and an abort, status 134),
    # so Ray is started first and ours go back on right after.
    handle_signals()
    init_ray(cfg.ray)
    handle_signals()
    url = start(cfg)
    kv_table("zhchat serve", {"model": cfg.serve.model, "engine": cfg.serve.engine, "chat page": url + "/",
                              "API": url + "/v1/chat/completions", "replicas":
                              f"{cfg.serve.min_replicas}..{cfg.serve.max_replicas}"})
    say(f"serving at {url} — Ctrl-C to stop")
    while not done.wait(1.0):
        pass
    say("stopping")
    stop(wait_s=30)
    return {"url": url, "model": cfg.serve.model}
