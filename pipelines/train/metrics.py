"""Training metrics: a JSONL file and TensorBoard in the run folder, a terminal line per
log step, MFU where the device's peak is known, and the loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

from zhchat.config import is_uri
from zhchat.storage import exists, join, local_copy

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
LOSS_PNG = "loss_curve.png"

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (FLOP/s per GPU).
# Matched against torch.cuda.get_device_name(), most specific name first.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 6000 Ada", 364e12), ("RTX A6000", 155e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12),
]


def device_peak_flops(device: str, half_precision: bool, configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (CPU without a measured value,
    a GPU not in the table, or fp32 on a GPU whose table value is for bf16)."""
    if configured:
        return configured
    if not device.startswith("cuda") or not half_precision:
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    for key, peak in GPU_PEAK_FLOPS:
        if key.lower() in name.lower():
            return peak
    return None


class MetricsLogger:
    """Rank 0's metrics sink. Writes locally; a cloud run folder is synced at each
    checkpoint and at the end (TensorBoard and JSONL files are appended, not rewritten)."""

    def __init__(self, run_dir: str, echo: bool = True):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        self.remote = is_uri(run_dir)
        self.local_dir = tempfile.mkdtemp(prefix="zhchat-metrics-") if self.remote else run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        if self.remote:
            self._download_existing()
        self.jsonl_path = os.path.join(self.local_dir, METRICS_FILE)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(self.local_dir, TB_DIR))
        self.echo = echo

    def _download_existing(self) -> None:
        """A resumed run appends to the metrics it already has."""
        remote = join(self.run_dir, METRICS_FILE)
        if exists(remote):
            local_copy(remote, os.path.join(self.local_dir, METRICS_FILE))

    def log(self, step: int, values: dict, kind: str = "train") -> None:
        row = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self.echo:
            echo(format_line(step, values, kind))

    def event(self, step: int, what: str, **extra) -> None:
        """A non-numeric event (start, resume, checkpoint) kept in the JSONL only."""
        row = {"step": step, "kind": "event", "event": what, "time": round(time.time(), 3), **extra}
        self._jsonl.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        self._jsonl.flush()

    def sync(self) -> None:
        self._tb.flush()
        self._jsonl.flush()
        if self.remote:
            from zhchat.storage import upload

            upload(self.local_dir, self.run_dir)

    def close(self) -> None:
        self.sync()
        self._tb.close()
        self._jsonl.close()
        if self.remote:
            shutil.rmtree(self.local_dir, ignore_errors=True)


def echo(line: str) -> None:
    """One line to the terminal. Ray Train patches print() to also log, which shows every
    line twice on the driver; writing to stdout directly shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_line(step: int, values: dict, kind: str) -> str:
    def fmt(k: str, v) -> str:
        if k == "lr":
            return f"lr {v:.2e}"
        if k == "tokens_per_s":
            return f"{v:,.0f} tok/s"
        if k == "mfu":
            return f"MFU {100 * v:.1f}%"
        if isinstance(v, float):
            return f"{k} {v:.4f}"
        return f"{k} {v}"

    return f"[{kind} step {step}] " + "  ".join(fmt(k, v) for k, v in values.items())


def read_metrics(text: str) -> list[dict]:
    """Rows of a metrics.jsonl; for a step logged twice (a retried attempt) the last wins."""
    rows: dict[tuple, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if r.get("kind") in ("train", "val"):
            rows[(r["kind"], r["step"])] = r
    return sorted(rows.values(), key=lambda r: (r["step"], r["kind"]))


def plot_loss_curve(rows: list[dict], png_path: str, title: str = "") -> str | None:
    """Training and validation loss against step; returns the path, or None with no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val" and "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
