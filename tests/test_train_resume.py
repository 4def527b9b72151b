"""Interrupted-and-resumed equals uninterrupted.

Run A trains 12 steps straight. Run B is killed after step 7 (a test hook raises in the
worker; max_failures=0 so the whole run fails, as a crash or Ctrl-C would), then the same
command is run again and continues from the step-6 checkpoint across an epoch boundary.
Dropout and the shuffle buffer are on, so this only holds if the data order, the skipped
batches and the RNG are restored exactly.

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


def _cfg(data: str, out: str, name: str):
    from zhchat.config import load_config

    return load_config(None, {"train": {"data": data, "out": out, "name": name, **TRAIN}}).resolved()


def test_interrupted_and_resumed_run_matches_uninterrupted(ray_cluster, tmp_path):
    from pipelines.train import train

    data = build_data_dir(str(tmp_path / "data"))  # 128 train dialogues: 8 steps per epoch
    out = str(tmp_path / "runs")
    straight = train(_cfg(data, out, "straight"))

    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        train(_cfg(data, out, "interrupted"), debug={"fail_at_step": 7})
    assert not os.path.exists(os.path.join(out, "interrupted", "latest.json"))
    resumed = train(_cfg(data, out, "interrupted"))  # the same command again

    assert resumed["final_metrics"]["start_step"] == 6
    assert resumed["step"] == straight["step"] == 12
    assert resumed["final_metrics"]["epoch"] == straight["final_metrics"]["epoch"] == 1
    assert resumed["final_metrics"]["tokens_seen"] == straight["final_metrics"]["tokens_seen"]
    assert resumed["final_metrics"]["val_loss"] == pytest.approx(straight["final_metrics"]["val_loss"], rel=1e-4)
    assert resumed["final_metrics"]["train_loss"] == pytest.approx(straight["final_metrics"]["train_loss"], rel=1e-4)

    # The metrics file of the resumed run holds both attempts; the loss curve uses the last of each step.
    with open(os.path.join(out, "interrupted", "metrics.jsonl")) as f:
        events = [json.loads(line).get("event") for line in f]
    assert events.count("start") == 1 and events.count("resume") == 1
