"""bench/gpu_check.py, the check a GPU machine runs first, must run where Ray is not
installed (the lent GPU machine has none) and on transformers 5.17 as well as the pinned
version. Here, without CUDA, its --cpu-smoke mode runs every part (training step in bf16,
fp16 and fp32, engine greedy equality, decode rates) on the CPU at tiny sizes; the real
check is the `gpu`-marked test, which runs only where CUDA is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
# Importing ray (or anything that needs it) fails in the child, as on the GPU machine.
NO_RAY = "import sys, runpy; sys.modules['ray'] = None; sys.argv = ['gpu_check'] + sys.argv[1:]; " \
         "runpy.run_path(%r, run_name='__main__')" % SCRIPT


def _run(python: str, *args: str, timeout: int = 600) -> dict:
    r = subprocess.run([python, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check_smoke(out: dict) -> None:
    assert out["ok"] is True, out
    assert set(out["train"]) == {"bf16", "fp16", "fp32"}
    assert all(r["finite"] and r["falling"] for r in out["train"].values())
    assert out["train"]["fp16"]["loss_scale"] > 0  # the fp16 path ran with a GradScaler
    assert out["engine"]["greedy_equal"] and out["engine"]["decode_tokens_per_s_b16"] > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the gpu test runs instead")
def test_without_cuda_it_says_so_and_exits_0():
    assert _run(sys.executable) == {"skipped": "no CUDA"}


def test_cpu_smoke_runs_without_ray():
    _check_smoke(_run(sys.executable, "--cpu-smoke"))


@pytest.mark.slow
def test_cpu_smoke_runs_on_transformers_5_17(tmp_path):
    """The GPU machine has transformers 5.17: a venv over this one's packages with 5.17."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", "transformers==5.17.0"], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    out = _run(py, "--cpu-smoke")
    assert out["transformers"] == "5.17.0"
    _check_smoke(out)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_check_on_a_gpu():
    out = _run(sys.executable, timeout=900)
    assert out["ok"] is True, out
    assert all(r["mfu"] is None or r["mfu"] > 0 for r in out["train"].values())
