"""A simulated two-node cluster (ray.cluster_utils.Cluster) loses a node mid-run.

The cluster is its own Ray instance, so the run happens in a child process (this file run
as a script) and never touches the session cluster of the other tests. Elastic training
(min_workers=1, num_workers=2): the run starts with 2 workers of 2 CPUs on worker nodes of
3 CPUs (the head has none, so training lands on the nodes; a spare CPU per node keeps Ray
Data's readers schedulable, see RAY_NOTES), so the node that is left holds one worker.
After the first checkpoint is registered the node of rank 0 is removed, and the run must
finish from that checkpoint on what is left, with the
global batch unchanged whatever the worker count, and the data going on at the same global
sample: the run is exactly one epoch of distinct rows, and a row-use log (a test hook) shows
every row used exactly once by the steps that count (a step redone after the restart counts
in its last attempt only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.timeout(1300)
def test_losing_a_node_resumes_from_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE) + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["removed_node"], r
    assert r["summary"]["step"] == r["max_steps"]
    assert r["summary"]["final_metrics"]["start_step"] > 0  # restarted from a checkpoint, not from 0
    starts = [e for e in r["events"] if e["event"] in ("start", "resume")]
    assert starts[0]["world_size"] == 2 and starts[0]["per_worker_batch"] == 4
    # Every attempt trains on the same global batch, whatever the worker count.
    assert all(e["world_size"] * e["per_worker_batch"] == 8 for e in starts)
    assert any(e["world_size"] == 1 for e in starts[1:])  # it did go on with fewer workers
    # Row uses: for each step, the rows of its last attempt (the one resumed latest before it).
    records = [json.load(open(os.path.join(r["row_log"], n))) for n in os.listdir(r["row_log"])]
    by_step: dict[int, list[int]] = {}
    for step in range(1, r["max_steps"] + 1):
        tried = [x for x in records if x["step"] == step]
        latest = max(x["attempt_start"] for x in tried)
        by_step[step] = [row for x in tried if x["attempt_start"] == latest for row in x["rows"]]
        assert len(by_step[step]) == 8, (step, tried)
    used = [row for rows in by_step.values() for row in rows]
    assert len(used) == len(set(used)) == r["n_rows"], "a training row was used twice or skipped within the epoch"
    assert any(x["attempt_start"] > 0 and x["step"] <= 8 for x in records)  # resumed mid-epoch


def _distinct_train_rows(data_dir: str, n: int) -> int:
    """Replace the train split with n rows whose token sequences all differ, so that a row's
    id (crc32 of its tokens, pipelines.train.data.row_ids) names one row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = {tuple(rng.integers(10, 500, size=int(rng.integers(8, 40)))) for _ in range(2 * n)}
    rows = [list(r) for r in list(rows)[:n]]
    d = os.path.join(data_dir, "tokens", "train")
    for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    for i, part in enumerate((rows[: n // 2], rows[n // 2:])):
        pq.write_table(pa.table({"input_ids": pa.array(part, pa.list_(pa.int32())),
                                 "labels": pa.array(part, pa.list_(pa.int32()))}), os.path.join(d, f"part-{i:05d}.parquet"))
    return len(rows)


def _child(tmp: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, HERE)
    from test_train_data import build_data_dir

    from zhchat.config import load_config

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")

    from pipelines.train import train

    data = build_data_dir(os.path.join(tmp, "data"))
    n_rows = _distinct_train_rows(data, 128)  # one epoch of 16 steps x 8
    out = os.path.join(tmp, "runs")
    row_log = os.path.join(tmp, "rows")
    max_steps = 16
    cfg = load_config(None, {"train": {
        "data": data, "out": out, "name": "elastic", "preset": "tiny", "global_batch_size": 8, "micro_batch_size": 4,
        "max_steps": max_steps, "checkpoint_every": 4, "log_every": 2, "num_workers": 2, "min_workers": 1,
        "max_failures": 3, "warmup_steps": 2,
        # 2 CPUs a worker on nodes of 3: the node that is left holds one worker, not both
        "cpus_per_worker": 2, "torch_threads": 1}}).resolved()
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = train(cfg, debug={"sleep_per_step": 1.0, "row_log": row_log})
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result["error"] = repr(e)

    t = threading.Thread(target=run)
    t.start()
    run_dir = os.path.join(out, "elastic")
    removed = None
    deadline = time.time() + 900
    # add_node/remove_node must run on the main thread; fit() runs in the other one.
    while t.is_alive() and time.time() < deadline and removed is None:
        time.sleep(0.5)
        snap = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if not (os.path.exists(snap) and os.path.exists(metrics)):
            continue
        if "checkpoint_step" not in open(snap).read():
            continue
        start = [json.loads(ln) for ln in open(metrics) if '"start"' in ln]
        node_id = start[0]["node_id"]
        victim = next((n for n in nodes if n.node_id == node_id), None)
        if victim is not None:
            cluster.remove_node(victim)
            removed = node_id
    t.join(timeout=max(1, deadline - time.time()))
    events = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl")) if '"event"' in ln]
    print("RESULT " + json.dumps({"removed_node": removed, "max_steps": max_steps, "events": events,
                                  "row_log": row_log, "n_rows": n_rows, **result}, default=str), flush=True)
    ray.shutdown()
    cluster.shutdown()
    if "error" in result:
        sys.exit(1)


if __name__ == "__main__":
    _child(sys.argv[1])
