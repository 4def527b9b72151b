"""Connecting to Ray and choosing devices from what the hardware offers."""

from __future__ import annotations

import logging
import os

from .config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster named by cfg.address or RAY_ADDRESS; else the cluster this machine
    is part of (a head or worker node started with `ray start`), so a command run on a GPU
    node uses the cluster's GPUs instead of a private cluster without them; else start a
    local one. Address "local" always starts a local one.

    Does nothing when Ray is already initialised (tests and `ray job submit` start it).
    """
    import ray

    configure_data()
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS") or running_cluster_address()
    if address and address != "local":
        ray.init(address=address, logging_level=logging.WARNING)
        return
    if cfg.serve_throughput_optimized:
        for key, value in high_throughput_serve_env().items():
            os.environ.setdefault(key, value)  # inherited by every Ray process of the cluster
    ray.init(
        address="local",  # start one; never attach to a stale `ray start` left on the machine
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.include_dashboard,
        logging_level=logging.WARNING,
    )


def running_cluster_address() -> str | None:
    """The GCS address of a live cluster this machine belongs to: the one `ray start` last
    wrote to /tmp/ray/ray_current_cluster, if a Ray process here still serves it (Ray's own
    discovery for address="auto"). A stale file from a stopped cluster gives None."""
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        address = find_bootstrap_address(None)
        return address if address and address in find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 - private API: without it, start a local cluster as before
        return None


def unused_ports(n: int) -> list[int]:
    """n distinct ports that nothing on this machine has bound (on any interface).

    Not kernel-chosen ports: those come from the ephemeral range, where Ray's own processes
    bind theirs after this returns (its dashboard agent's 52365 was taken this way, and
    HAProxy failed to start). Ports 20000-29999 lie above Ray's worker ports (10002-19999),
    below Serve's direct-ingress ports (30000-31000, 40000-41000) and below Linux's
    ephemeral range (32768-60999)."""
    import random
    import socket

    def bindable(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))  # HAProxy and Ray listen on all interfaces
            except OSError:
                return False
            return True

    rng = random.SystemRandom()
    for _ in range(100):
        ports = rng.sample(range(20000, 30000), n)  # sample() keeps them distinct
        if all(bindable(p) for p in ports):
            return ports
    raise RuntimeError(f"no {n} free ports in 20000-29999")


def high_throughput_serve_env() -> dict[str, str]:
    """Ray's high-throughput Serve mode, as its KubeRay guide sets it: HAProxy (C) as the HTTP
    ingress in place of the Python proxy actor, handing requests straight to the ingress
    replicas' own ports, and direct gRPC between replicas. The proxy actor was a third of
    a core at 16 streams on the serve benchmark, and replies per second were 40% lower.

    Ray puts HAProxy's files in /tmp/haproxy-serve and its stats and metrics on ports
    8404/9101 (on all interfaces, as Ray's template has them): one set per machine. Each
    local cluster here gets its own folder and free ports, so two on one machine (the
    tests, a bench beside `zhchat serve`) do not share one HAProxy's socket or ports."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="zhchat-haproxy-")
    stats_port, metrics_port = unused_ports(2)
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        # A deleted app's ingress replicas stay up this long so every node's HAProxy stops
        # routing to them first (30 s by default). One machine's HAProxy is told at once, and
        # the 30 s made Ctrl-C on `zhchat serve` (and every app delete) wait it out.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


# Input bytes one hash-shuffle map task partitions at once (see configure_data).
SHUFFLE_BATCH_BYTES = 64 << 20


def configure_data() -> None:
    """Ray Data settings of this driver process (every stage calls init_ray, which calls this).

    Parquet is read through Ray Data's V1 datasource: in 2.60 the default V2 path lists files
    by starting a pool of 32 FooterReader actors for every read (a Python process each: seconds
    of CPU and ~100 MB apiece on a 2-core machine) and bin-packs files into 128 MiB read
    tasks, so a 30 MB input becomes one task and one block (nothing for a second actor to do
    downstream, and memory that grows with the input). V1 reads the footers in the driver and
    runs one read task per file, splitting its output into blocks (bench/preprocess.py).

    The hash shuffle's map side gathers a node's input blocks until shuffle_input_batch_bytes
    (1 GiB by default) and partitions them in one task. Near-dedup's band rows are ~8x the
    corpus, so at the default one map task held the whole band table while the other cores
    idled, and the stage's heap grew with the input. SHUFFLE_BATCH_BYTES bounds each map
    task's input instead (tests/test_dedup.py)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.shuffle_input_batch_bytes = SHUFFLE_BATCH_BYTES


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for `precision` on `device` (None: fp32). The rule for "auto":
    bf16 only on GPUs with native bf16 (compute capability >= 8: A100, H100, L4, RTX 30xx
    and later); fp16 (with a GradScaler when training) on older GPUs (V100, T4), where
    torch.cuda.is_bf16_supported() also says yes because bf16 is emulated, and slowly;
    fp32 on CPU, where bf16 is slower than fp32 without AMX. Training and the engine's
    load dtype both use it."""
    import torch

    device = str(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if not device.startswith("cuda"):  # "cuda:1" is a CUDA device too
        return None
    major, _minor = torch.cuda.get_device_capability(torch.device(device))
    return torch.bfloat16 if major >= 8 else torch.float16
