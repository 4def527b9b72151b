"""Eval's use of GPUs: never more model actors than the cluster has GPUs, a config field to
decide, and scoring under the training precision rule. No GPU here: cluster GPU counts are
given as numbers, and bf16 autocast runs on the CPU."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("choice, cluster_gpus, expected", [
    ("auto", 0, (0, 1 << 30)),   # a CPU cluster: CPU actors, as many as asked
    ("auto", 2, (1, 2)),         # two GPUs: at most two actors, one GPU each
    ("no", 8, (0, 1 << 30)),     # told not to
    ("yes", 0, (1, 1)),          # GPU nodes not up yet: one actor, the autoscaler brings a node
    ("yes", 3, (1, 3)),
])
def test_eval_never_asks_for_more_gpus_than_the_cluster_has(choice, cluster_gpus, expected):
    from pipelines.evaluate import eval_gpus

    assert eval_gpus(choice, cluster_gpus) == expected


def test_eval_config_decides_gpu_use():
    from zhchat.config import ConfigError, load_config

    assert load_config(None, {"eval": {"use_gpu": "no"}}).eval.use_gpu == "no"
    with pytest.raises(ConfigError, match="use_gpu"):
        load_config(None, {"eval": {"use_gpu": "maybe"}})


def test_scoring_under_autocast_matches_fp32(tiny_model_dir):
    """The scorer's forward runs under the autocast dtype it is given (bf16 here, on the
    CPU); the NLL stays close to fp32 and the token counts are the same."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import score_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 500, size=n) for n in (12, 30, 7)]
    batch = {"input_ids": np.array(rows, dtype=object), "labels": np.array(rows, dtype=object)}
    fp32 = score_batch(model, batch, 0)
    bf16 = score_batch(model, batch, 0, amp_dtype=torch.bfloat16)
    assert (fp32["tokens"] == bf16["tokens"]).all()
    np.testing.assert_allclose(bf16["nll"], fp32["nll"], rtol=0.05)
    assert not np.array_equal(bf16["nll"], fp32["nll"])  # it did run in bf16
