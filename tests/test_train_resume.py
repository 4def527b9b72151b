"""Interrupted-and-resumed equals uninterrupted.

Run A trains 12 steps straight. Run B is killed after step 7 (a test hook raises in the
worker; max_failures=0 so the whole run fails, as a crash or Ctrl-C would), then the same
command is run again and continues from the step-6 checkpoint across an epoch boundary.
Dropout and the shuffle buffer are on, so this only holds if the data order, the skipped
batches and the RNG are restored exactly.

The same holds in fp16 with loss scaling (CPU fp16 autocast with GradScaler("cpu") stands
in for a GPU without native bf16): the scaler's scale and growth tracker travel in the
checkpoint, so the resumed run scales, skips and steps exactly as the straight one.

Tolerance: final validation losses agree to 1e-4 (relative); on one CPU worker they are
in practice identical.
"""

from __future__ import annotations

import json
import os

import pytest

from test_train_data import build_data_dir

TRAIN = dict(preset="tiny", global_batch_size=16, micro_batch_size=8, lr=3e-3, warmup_steps=2, dropout=0.1,
             log_every=3, checkpoint_every=6, max_steps=12, max_failures=0, shuffle_buffer=64, torch_threads=1)


def _cfg(data: str, out: str, name: str, precision: str):
    from zhchat.config import load_config

    return load_config(None, {"train": {"data": data, "out": out, "name": name, "precision": precision,
                                        **TRAIN}}).resolved()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interrupted_and_resumed_run_matches_uninterrupted(ray_cluster, tmp_path, precision):
    from pipelines.train import train

    data = build_data_dir(str(tmp_path / "data"))  # 128 train dialogues: 8 steps per epoch
    out = str(tmp_path / "runs")
    # fp16: a first scale that overflows, so that skipped steps happen before and after the
    # interruption and the restored scaler state matters.
    debug = {"init_scale": 2.0**24} if precision == "fp16" else {}
    straight = train(_cfg(data, out, "straight", precision), debug=debug)

    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        train(_cfg(data, out, "interrupted", precision), debug={**debug, "fail_at_step": 7})
    assert not os.path.exists(os.path.join(out, "interrupted", "latest.json"))
    resumed = train(_cfg(data, out, "interrupted", precision), debug=debug)  # the same command again

    assert resumed["final_metrics"]["start_step"] == 6
    assert resumed["step"] == straight["step"] == 12
    # 8 batches per epoch: epoch 1 at step 12, later when the fp16 scaler skipped steps
    assert resumed["final_metrics"]["epoch"] == straight["final_metrics"]["epoch"] >= 1
    assert resumed["final_metrics"]["tokens_seen"] == straight["final_metrics"]["tokens_seen"]
    assert resumed["final_metrics"]["val_loss"] == pytest.approx(straight["final_metrics"]["val_loss"], rel=1e-4)
    assert resumed["final_metrics"]["train_loss"] == pytest.approx(straight["final_metrics"]["train_loss"], rel=1e-4)

    # The metrics file of the resumed run holds both attempts; the loss curve uses the last of each step.
    with open(os.path.join(out, "interrupted", "metrics.jsonl")) as f:
        events = [json.loads(line).get("event") for line in f]
    assert events.count("start") == 1 and events.count("resume") == 1
    if precision == "fp16":
        with open(os.path.join(out, "straight", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert any(r.get("event") == "skipped_step" for r in rows)  # the scaler did skip steps
        assert [r["loss_scale"] for r in rows if r.get("kind") == "train"][-1] < 2.0**24
