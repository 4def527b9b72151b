"""Connecting to Ray and choosing devices from what the hardware offers."""

from __future__ import annotations

import logging
import os

from .config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster named by cfg.address or RAY_ADDRESS, else start a local one.

    Does nothing when Ray is already initialised (tests and `ray job submit` start it).
    """
    import ray

    configure_data()
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    if cfg.serve_throughput_optimized:
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # inherited by every Ray process
    ray.init(
        address="local",  # start one; never attach to a stale `ray start` left on the machine
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        include_dashboard=cfg.include_dashboard,
        logging_level=logging.WARNING,
    )


def configure_data() -> None:
    """Ray Data settings of this driver process (every stage calls init_ray, which calls this).

    Parquet is read through Ray Data's V1 datasource: in 2.60 the default V2 path lists files
    by starting a pool of 32 FooterReader actors for every read (a Python process each: seconds
    of CPU and ~100 MB apiece on a 2-core machine) and bin-packs files into 128 MiB read
    tasks, so a 30 MB input becomes one task and one block (nothing for a second actor to do
    downstream, and memory that grows with the input). V1 reads the footers in the driver and
    runs one read task per file, splitting its output into blocks (bench/preprocess.py)."""
    from ray.data import DataContext

    DataContext.get_current().use_datasource_v2 = False


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def best_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast_dtype(device: str, precision: str = "auto"):
    """bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU (bf16 is slower there)."""
    import torch

    device = device.split(":")[0]  # "cuda:1" is a CUDA device too
    if precision == "fp32" or (precision == "auto" and device != "cuda"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16
