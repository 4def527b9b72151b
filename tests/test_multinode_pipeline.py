"""The whole pipeline on a simulated 3-node cluster that loses a worker node mid-training.

`zhchat.run.run_all` runs ingest -> preprocess -> train -> eval on a ray.cluster_utils.Cluster:
a head with no CPUs (it runs the driver, the GCS and the Serve controller, never stage work)
and two worker nodes of 3 logical CPUs (more than the 2 physical cores; they are slots, not
cores). Training asks for 2 workers x 2 CPUs, so no node holds both: rank 0 and rank 1 land
on different nodes, and each node keeps one CPU for Ray Data's readers (RAY_NOTES: workers
holding every CPU next to an unexecuted dataset hang). The run is elastic (min_workers=1,
num_workers=2); once a checkpoint is registered the node of rank 0 is removed, and the run
must finish on the node that is left, from that checkpoint. Then the Serve app answers a chat
completion over HTTP with the trained model, and every table on disk is counted against the
summaries: nothing duplicated, nothing missing.

The cluster is its own Ray instance, so it runs in a child process (this file run as a
script), like tests/test_train_cluster.py, and never touches the session's `ray_cluster`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_STEPS = 24
CHECKPOINT_EVERY = 4
GLOBAL_BATCH = 8
CHILD_TIMEOUT_S = 540
# (file, line) of the malformed records write_corpus puts in, which ingest must quarantine.
BAD_LINES = {("chats.jsonl", 6), ("chats.jsonl", 51), ("messages.jsonl", 4), ("messages.jsonl", 71)}


# -- the corpus: two formats, each with a blank line (skipped) and two malformed lines -----------

def write_corpus(folder: str) -> dict:
    """LCCC JSON lines and OpenAI-style messages; returns what ingest should count."""
    sys.path.insert(0, HERE)
    from conftest import make_dialogues

    os.makedirs(folder, exist_ok=True)
    lccc = make_dialogues(220, seed=11)
    openai = make_dialogues(140, seed=12)
    lines = [json.dumps(d, ensure_ascii=False) for d in lccc]
    # Malformed lines go after the first line: detection reads the first one.
    lines[5:5] = ['["这一行没有写完", ', ""]          # invalid JSON, blank line (skipped)
    lines[50:50] = ['["第二句不是字符串", 42]']       # a non-string utterance
    with open(os.path.join(folder, "chats.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    rows = []
    for i, d in enumerate(openai):
        msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(d)]
        if len(msgs) % 2:  # end on the reply, so every record is one dialogue as written
            msgs.pop()
        if i % 7 == 0:
            msgs.insert(0, {"role": "system", "content": "你是一个友好的助手。"})
        rows.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    rows[3:3] = ['{"messages": "不是列表"}', ""]    # 'messages' is a string; blank line
    rows[70:70] = ['{"messages": [{"role": "robot", "content": "你好"}]}']  # unknown role
    with open(os.path.join(folder, "messages.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(rows) + "\n")
    return {"kept": len(lccc) + len(openai), "skipped": 2, "quarantined": 4}


# -- the test (parent process): run the child, then count everything it left on disk -----------

@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT_S + 120)
def test_pipeline_on_three_nodes_survives_losing_a_worker_node(tmp_path):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    expected = write_corpus(str(tmp_path / "corpus"))
    from conftest import own_cluster_env  # tests/ is on sys.path under pytest

    env = own_cluster_env(PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    # Own session: on a timeout the child and the Ray processes it started are killed as a group.
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"child timed out after {CHILD_TIMEOUT_S}s\n{out[-3000:]}\n{err[-5000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-4000:] + err[-6000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in r, r.get("error")
    work = tmp_path / "work"

    # run_all ran every stage once, on the 3-node cluster, and left a fingerprint for each.
    assert r["alive_nodes_at_start"] == 3, r
    assert r["stages"] == {"ingest": "ran", "preprocess": "ran", "train": "ran", "eval": "ran"}, r["stages"]
    for stage in r["stages"]:
        assert (work / ".stages" / f"{stage}.json").exists(), stage

    # -- training: two workers on the two worker nodes, one node lost, resumed from a checkpoint
    workers = set(r["worker_nodes"])
    bundles = r.get("train_bundle_nodes") or []
    assert len(bundles) == 2 and set(bundles) == workers, r  # one worker per node, not packed
    assert r.get("removed_node") in workers and r.get("checkpoint_at_kill", 0) > 0, r
    events = r["events"]
    starts = [e for e in events if e["event"] in ("start", "resume")]
    assert starts[0]["event"] == "start" and starts[0]["world_size"] == 2 and starts[0]["node_id"] == r["removed_node"]
    resumes = [e for e in starts if e["event"] == "resume"]
    assert resumes, events
    # Resumed from a registered checkpoint (not step 0), on what is left, with the same global batch.
    assert resumes[-1]["step"] >= r["checkpoint_at_kill"] > 0
    assert resumes[-1]["world_size"] == 1 and resumes[-1]["node_id"] != r["removed_node"]
    assert all(e["world_size"] * e["per_worker_batch"] == GLOBAL_BATCH for e in starts)
    tr = r["train"]
    assert tr["status"] == "finished" and tr["step"] == MAX_STEPS, tr
    assert tr["final_metrics"]["start_step"] > 0 and tr["final_metrics"]["world_size"] == 1, tr
    assert os.path.dirname(tr["best_checkpoint"]) == str(work / "train" / "multinode")

    # -- eval and serve used that run's checkpoint
    assert r["eval"]["model"] == tr["best_checkpoint"] and r["eval"]["perplexity"] > 1, r["eval"]
    reply = r["chat"]
    assert reply["object"] == "chat.completion", reply
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < reply["usage"]["completion_tokens"] <= 8

    # -- ingest: read = kept + skipped + quarantined, and the tables hold exactly those rows
    summary = json.loads((work / "ingest" / "summary.json").read_text())
    totals = summary["totals"]
    for f in summary["files"].values():
        assert f["read"] == f["kept"] + f["skipped"] + f["quarantined"], f
    assert totals == {"read": sum(expected.values()), **expected}, totals
    dialogues = pq.read_table(work / "ingest" / "dialogues")
    assert dialogues.num_rows == totals["kept"]
    quarantine = pq.read_table(work / "ingest" / "quarantine")
    assert quarantine.num_rows == totals["quarantined"] and all(quarantine.column("reason").to_pylist())
    assert {(os.path.basename(f), n) for f, n in zip(quarantine.column("file").to_pylist(),
                                                     quarantine.column("line").to_pylist())} == BAD_LINES

    # -- preprocess: the manifest's counts are the rows on disk
    data = work / "data"
    c = json.loads((data / "manifest.json").read_text())["counts"]
    assert c["read"] == totals["kept"]
    removed = pq.read_table(data / "removed") if (data / "removed").exists() else None
    n_removed = removed.num_rows if removed is not None else 0
    assert n_removed == sum(c["removed"].values()) + c["dedup_removed"], (n_removed, c["removed"], c["dedup_removed"])
    assert c["kept"] == c["read"] - n_removed == sum(s["dialogues"] for s in c["splits"].values())
    split_ids: list[str] = []
    for split, counts in c["splits"].items():
        seg = pq.read_table(data / "segmented" / split)
        assert seg.num_rows == counts["dialogues"] > 0, (split, seg.num_rows, counts)
        split_ids += seg.column("id").to_pylist()
        tokens = pq.read_table(data / "tokens" / split)
        assert tokens.num_rows == counts["sequences"], (split, tokens.num_rows, counts)
        assert pc.sum(pc.list_value_length(tokens.column("input_ids"))).as_py() == counts["tokens"]
    # Each kept dialogue is in exactly one split; every ingested row is kept or removed, once.
    assert len(split_ids) == len(set(split_ids)) == c["kept"]
    removed_ids = removed.column("id").to_pylist() if removed is not None else []
    assert Counter(dialogues.column("id").to_pylist()) == Counter(split_ids) + Counter(removed_ids)
    print(f"child wall time {r['seconds']:.0f}s (stages {r['stage_seconds']})")


# -- the child: a 3-node cluster, run_all in a thread, the node kill on the main thread ------------

def _wait_for_checkpoint_and_kill(cluster, nodes, run_dir: str, thread: threading.Thread, found: dict) -> None:
    """Poll the run folder; note where the 2 training workers were placed; once Ray lists a
    checkpoint (checkpoint_manager_snapshot.json), remove the node of rank 0.
    add_node/remove_node must run on the main thread (RAY_NOTES)."""
    import ray

    snap = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while thread.is_alive() and "removed_node" not in found:
        time.sleep(0.5)
        if not os.path.exists(metrics):
            continue
        start = [json.loads(ln) for ln in open(metrics) if '"event": "start"' in ln]
        if not start:
            continue
        if "train_bundle_nodes" not in found:
            # Ray Train's worker group: 2 bundles of 2 CPUs (from the GCS; no dashboard needed).
            for pg in ray.util.placement_group_table().values():
                bundles = list(pg["bundles"].values())
                if pg["state"] == "CREATED" and len(bundles) == 2 and all(b.get("CPU") == 2.0 for b in bundles):
                    found["train_bundle_nodes"] = list(pg["bundles_to_node_id"].values())
        if not os.path.exists(snap):
            continue
        try:
            latest = json.load(open(snap)).get("latest_checkpoint_result") or {}
        except ValueError:  # being rewritten
            continue
        name = latest.get("checkpoint_dir_name") or ""
        if not name.startswith("checkpoint_step"):
            continue
        victim = next((n for n in nodes if n.node_id == start[0]["node_id"]), None)
        assert victim is not None, f"rank 0 ran on {start[0]['node_id']}, not on a worker node"
        found["checkpoint_at_kill"] = int(name[len("checkpoint_step"):])
        cluster.remove_node(victim)
        found["removed_node"] = victim.node_id


def _child(tmp: str) -> None:
    import httpx
    import ray
    from ray.cluster_utils import Cluster

    from conftest import free_port  # this file's folder is on sys.path when it runs as a script

    t_start = time.time()
    # After a node is lost, Ray Train's elastic policy still sees the dead node's resources for a
    # moment, tries the old size first and gives up only after this start timeout (60 s by
    # default) before shrinking; 30 s still leaves room for a first start on a loaded machine.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    result: dict = {}
    try:
        nodes = [cluster.add_node(num_cpus=3, include_dashboard=False) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        result["worker_nodes"] = [n.node_id for n in nodes]
        result["alive_nodes_at_start"] = sum(1 for n in ray.nodes() if n["Alive"])

        import pipelines.train as train_pkg
        from services import launch
        from zhchat.config import load_config
        from zhchat.run import run_all

        # The stage adapter run_all calls, with the loop's test hook: a pause per step leaves
        # time to remove a node between the first checkpoint and the last step.
        train_pkg.run_train = lambda cfg, args: train_pkg.train(cfg, debug={"sleep_per_step": 0.3})

        cfg = load_config(None, {
            "workdir": os.path.join(tmp, "work"),
            "ray": {"include_dashboard": False},
            "ingest": {"inputs": [os.path.join(tmp, "corpus")]},
            # The corpus draws every turn from 16 sentences (conftest.make_dialogues): the
            # near-duplicate and repeated-turn rules would remove nearly all of it, and this
            # test is about the cluster, not the cleaning (tests/test_dedup.py is).
            "preprocess": {"tokenizer": {"vocab_size": 400}, "format": {"context_length": 64},
                           "segment": {"actors": 2}, "split": {"validation": 0.1, "test": 0.1},
                           "clean": {"near_dup": {"dialogues": False, "replies": False},
                                     "quality": {"max_repeated_turns": None}}},
            "train": {"name": "multinode", "preset": "tiny", "max_steps": MAX_STEPS, "checkpoint_every": CHECKPOINT_EVERY,
                      "log_every": 2, "global_batch_size": GLOBAL_BATCH, "micro_batch_size": 4, "warmup_steps": 2,
                      "num_workers": 2, "min_workers": 1, "cpus_per_worker": 2, "torch_threads": 1,
                      "max_failures": 3, "val_max_sequences": 32},
            "eval": {"max_samples": 6, "max_new_tokens": 8, "batch_size": 8},
            "serve": {"host": "127.0.0.1", "port": free_port(), "min_replicas": 1, "max_replicas": 1,
                      "replica_cpus": 0.5, "ingress_cpus": 0.25, "generation": {"max_tokens": 8}},
        }).resolved()

        def run() -> None:
            try:
                result["stages"] = run_all(cfg, argparse.Namespace(config=None, config_file=None, no_serve=True))["stages"]
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                import traceback

                result["error"] = traceback.format_exc() or repr(e)

        thread = threading.Thread(target=run)
        thread.start()
        found: dict = {}
        _wait_for_checkpoint_and_kill(cluster, nodes, os.path.join(cfg.train.out, "multinode"), thread, found)
        result.update(found)
        thread.join(timeout=CHILD_TIMEOUT_S)
        if "error" in result or thread.is_alive():
            result.setdefault("error", "run_all did not finish")
            return

        work = cfg.workdir
        marks = {s: json.load(open(os.path.join(work, ".stages", f"{s}.json"))) for s in result["stages"]}
        result["train"] = marks["train"]["summary"]
        result["eval"] = {k: marks["eval"]["summary"].get(k) for k in ("model", "perplexity")}
        result["stage_seconds"] = {s: round(m["seconds"]) for s, m in marks.items()}
        run_dir = os.path.join(cfg.train.out, "multinode")
        result["events"] = [json.loads(ln) for ln in open(os.path.join(run_dir, "metrics.jsonl")) if '"event"' in ln]

        url = launch.start(cfg)
        body = {"messages": [{"role": "user", "content": "你好，今天天气怎么样？"}], "max_tokens": 8, "seed": 1}
        deadline = time.time() + 60
        while True:  # the proxy may take a moment to accept connections after serve.run returns
            try:
                resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        assert resp.status_code == 200, resp.text
        result["chat"] = resp.json()
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        result["error"] = traceback.format_exc()
    finally:
        result["seconds"] = time.time() - t_start
        print("RESULT " + json.dumps(result, ensure_ascii=False, default=str), flush=True)
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve may never have started
            pass
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _child(sys.argv[1])
