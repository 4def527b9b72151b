"""A small synthetic preprocess output folder (shared by the train/eval tests) and the
plain batch functions of pipelines/train/data.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import build_tiny_tokenizer, make_dialogues


def build_data_dir(out: str, n_dialogues: int = 160, context_length: int = 64, seed: int = 0,
                   tokenizer=None) -> str:
    """DATA/ as `zhchat preprocess` writes it: tokenizer/, tokens/{split}/, segmented/{split}/,
    manifest.json. Dialogues are encoded with the real DialogueFormat."""
    import jieba
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zhchat.dialogue import DialogueFormat, messages_from_turns
    from zhchat.tables import dialogue_id

    tok = tokenizer or build_tiny_tokenizer(os.path.join(out, "tokenizer"))
    if tokenizer is not None:
        tok.save_pretrained(os.path.join(out, "tokenizer"))
    fmt = DialogueFormat(tok, context_length)
    dialogues = make_dialogues(n_dialogues, seed=seed)
    n_val = n_test = max(2, n_dialogues // 10)
    splits = {"validation": dialogues[:n_val], "test": dialogues[n_val:n_val + n_test],
              "train": dialogues[n_val + n_test:]}
    for split, rows in splits.items():
        ids, labels = zip(*(fmt.encode_dialogue(messages_from_turns(turns)) for turns in rows))
        for kind, table in (
            ("tokens", pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                                 "labels": pa.array(labels, pa.list_(pa.int32()))})),
            ("segmented", pa.table({
                "id": [dialogue_id(t) for t in rows], "source": ["synthetic"] * len(rows),
                "turns": pa.array(rows, pa.list_(pa.string())), "system": [""] * len(rows),
                "words": pa.array([[" ".join(jieba.lcut(u)) for u in t] for t in rows], pa.list_(pa.string())),
            })),
        ):
            d = os.path.join(out, kind, split)
            os.makedirs(d, exist_ok=True)
            # Two files per split, as a real run writes several shards.
            half = len(table) // 2
            pq.write_table(table.slice(0, half), os.path.join(d, "part-00000.parquet"))
            pq.write_table(table.slice(half), os.path.join(d, "part-00001.parquet"))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump({"config": {"format": {"context_length": context_length, "loss_on": "replies"}},
                   "counts": {k: len(v) for k, v in splits.items()}}, f)
    return out


def test_collate_pads_right_with_ignored_labels():
    from pipelines.train.data import collate

    batch = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
             "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object)}
    b = collate(batch, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["lengths"].tolist() == [3, 1]


def test_collate_rejects_mismatched_rows():
    from pipelines.train.data import collate

    batch = {"input_ids": np.array([np.array([1, 2])], dtype=object), "labels": np.array([np.array([1])], dtype=object)}
    with pytest.raises(ValueError, match="row 0"):
        collate(batch, 0)


def test_micro_batches_cover_every_row_once_and_trim_padding():
    from pipelines.train.data import collate, count_targets, micro_batches

    rows = [np.arange(1, n + 1) for n in (9, 2, 5, 3, 8)]
    b = collate({"input_ids": np.array(rows, dtype=object), "labels": np.array(rows, dtype=object)}, 0)
    chunks = micro_batches(b, 2)
    assert [len(c["input_ids"]) for c in chunks] == [2, 2, 1]
    assert [c["input_ids"].shape[1] for c in chunks] == [3, 8, 9]  # grouped by length, each cut to its longest
    assert sum(count_targets(c["labels"]) for c in chunks) == count_targets(b["labels"])


def test_count_targets_uses_shifted_labels():
    from pipelines.train.data import count_targets

    labels = np.array([[5, 6, -100, 7], [-100, -100, 1, -100]])
    assert count_targets(labels) == 3  # position 0 is never predicted


def test_manifest_context_length_and_errors(tmp_path):
    from pipelines.manifest import context_length, data_format, load_manifest

    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_manifest(str(tmp_path))
    d = build_data_dir(str(tmp_path / "data"), n_dialogues=20)
    assert context_length(load_manifest(d)) == 64 and data_format(load_manifest(d))["loss_on"] == "replies"
    # One place: config.format, as preprocess writes it (pipelines/manifest.py build_manifest).
    assert context_length({"config": {"format": {"context_length": 128}}}) == 128
    with pytest.raises(ValueError, match="context_length"):
        context_length({"config": {"format": {}}})
    with pytest.raises(ValueError, match="config.format"):
        context_length({"preprocess": {"format": {"context_length": 128}}})


def test_resolve_checkpoint_paths(tmp_path):
    from zhchat.checkpoints import resolve_checkpoint

    run = tmp_path / "runs" / "r"
    for step in (4, 8):
        (run / f"checkpoint_step{step:07d}").mkdir(parents=True)
        (run / f"checkpoint_step{step:07d}" / "config.json").write_text("{}")
    # a half-uploaded folder that Ray never registered
    (run / "checkpoint_step0000012").mkdir()
    (run / "checkpoint_step0000012" / "config.json").write_text("{")
    snap = {"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_step0000004", "metrics": {"val_loss": 2.0}},
        {"checkpoint_dir_name": "checkpoint_step0000008", "metrics": {"val_loss": 2.5}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_step0000008"}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snap))
    # no latest.json (run stopped early): the best registered checkpoint
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_step0000004")
    (run / "latest.json").write_text(json.dumps({"best_checkpoint": "checkpoint_step0000008"}))
    assert resolve_checkpoint(str(run)) == str(run / "checkpoint_step0000008")
    (tmp_path / "runs" / "latest.json").write_text(json.dumps({"run": "r"}))
    assert resolve_checkpoint(str(tmp_path / "runs")) == str(run / "checkpoint_step0000008")
    assert resolve_checkpoint(str(run / "checkpoint_step0000004")) == str(run / "checkpoint_step0000004")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_read_split_gives_a_pool_a_block_per_actor(ray_cluster, tmp_path):
    """One shard is one block (each block costs the training loop a fetch), unless more are
    asked for: evaluation's N model actors need N blocks, or all but one sit idle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.train.data import read_split

    d = tmp_path / "tokens" / "test"
    d.mkdir(parents=True)
    rows = [list(range(i, i + 5)) for i in range(40)]
    pq.write_table(pa.table({"input_ids": rows, "labels": rows}), d / "part-00000.parquet")
    one = read_split(str(tmp_path), "test").materialize()
    three = read_split(str(tmp_path), "test", min_blocks=3).materialize()
    assert one.num_blocks() == 1 and three.num_blocks() >= 3
    assert sorted(list(r["input_ids"]) for r in three.take_all()) == sorted(rows)
