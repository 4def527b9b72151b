"""The split is a stable function of (salt, id): same on every run and in every process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pytest

from pipelines.split import assign_split, split_batch
from zhchat.config import SplitConfig
from zhchat.tables import dialogue_id

IDS = [dialogue_id([f"对话 {i}", "好的"]) for i in range(20000)]
CFG = SplitConfig(validation=0.1, test=0.05)


def test_same_split_twice():
    assert assign_split(IDS, CFG) == assign_split(list(IDS), SplitConfig(validation=0.1, test=0.05))


def test_same_split_in_another_process():
    """Python's hash() is salted per process; the split must not be."""
    code = ("import json, sys; from pipelines.split import assign_split; from zhchat.config import SplitConfig; "
            "ids = json.load(sys.stdin); print(json.dumps(assign_split(ids, SplitConfig(validation=0.1, test=0.05))))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(IDS[:2000]), capture_output=True,
                         text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert json.loads(out.stdout) == assign_split(IDS[:2000], CFG)


def test_fractions_and_disjointness():
    splits = assign_split(IDS, CFG)
    counts = Counter(splits)
    assert set(counts) == {"train", "validation", "test"}
    assert abs(counts["validation"] / len(IDS) - 0.10) < 0.01
    assert abs(counts["test"] / len(IDS) - 0.05) < 0.01
    by_split = {s: {i for i, x in zip(IDS, splits) if x == s} for s in counts}
    assert not (by_split["train"] & by_split["validation"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["validation"] & by_split["test"])


def test_salt_reshuffles_and_fractions_move_only_their_share():
    a = assign_split(IDS, CFG)
    assert a != assign_split(IDS, SplitConfig(validation=0.1, test=0.05, salt="other"))
    # a larger validation share takes dialogues from train only; test is untouched
    b = assign_split(IDS, SplitConfig(validation=0.2, test=0.05))
    assert all(y == x for x, y in zip(a, b) if x == "test")
    assert all(y == "validation" for x, y in zip(a, b) if x == "validation")
    assert all(assign_split(IDS[:100], SplitConfig(validation=0, test=0))[i] == "train" for i in range(100))


def test_split_batch_kinds():
    ids = IDS[:5]
    expected = assign_split(ids, CFG)
    assert split_batch({"id": ids, "turns": [["a"]] * 5}, CFG)["split"] == expected
    table = split_batch(pa.table({"id": ids}), CFG)
    assert table.column("split").to_pylist() == expected
    with pytest.raises(ValueError, match="without an id"):
        assign_split(["ok", ""], CFG)
