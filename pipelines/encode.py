"""Tokenized training shards: OUT/tokens/{train,validation,test}/*.parquet.

Each row is one training sequence: `input_ids` and `labels` (list<int32>, labels -100 where
there is no loss), laid out only by zhchat.dialogue.DialogueFormat, the same code serving
uses to build prompts:
- a dialogue (two or more turns, or a system prompt) -> encode_dialogue(messages_from_turns(...))
- a single-turn row without system prompt is plain text -> pack_texts, full context-length
  blocks with loss on every token. Packing runs per batch, so each batch drops its last
  partial block (under context_length tokens); batches are large to keep that small.

All splits go through ONE Ray Data pass: a pool of actors (tokenizer loaded once each)
encodes a batch, writes its shard and returns only counts. One pass instead of a write and a
count per split matters: every Ray Data execution starts its own actors, and each of those
imports transformers (seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from zhchat import storage
from zhchat.config import FormatConfig, is_uri
from zhchat.dialogue import IGNORE_INDEX, DialogueFormat, messages_from_turns

SPLITS = ("train", "validation", "test")
TOKENS_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
COUNTS = ("dialogues", "sequences", "tokens", "loss_tokens", "chars", "text_tokens")
BATCH_ROWS = 4096


def encode_rows(turns: list[list[str]], systems: list[str], fmt: DialogueFormat) -> pa.Table:
    """Training sequences for a batch of dialogue rows (plain function; tests call it)."""
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    texts: list[str] = []
    for t, s in zip(turns, systems):
        t = [x for x in (t or []) if x]
        if not t:
            continue
        if len(t) == 1 and not s:
            texts.append(t[0])
            continue
        ids, labels = fmt.encode_dialogue(messages_from_turns(t, s or None))
        ids_out.append(ids)
        labels_out.append(labels)
    for ids, labels in fmt.pack_texts(texts):
        ids_out.append(ids)
        labels_out.append(labels)
    return pa.table({"input_ids": pa.array(ids_out, pa.list_(pa.int32())),
                     "labels": pa.array(labels_out, pa.list_(pa.int32()))}, schema=TOKENS_SCHEMA)


def count_tokens(shard: pa.Table) -> dict[str, int]:
    """Sequences, tokens and loss tokens of shard rows."""
    labels = pc.list_flatten(shard.column("labels"))
    return {
        "sequences": shard.num_rows,
        "tokens": int(pc.sum(pc.list_value_length(shard.column("input_ids"))).as_py() or 0),
        "loss_tokens": int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
    }


def write_shard(table: pa.Table, folder: str, name: str) -> str:
    """Write one shard (local folder or cloud URI). Names are content hashes, so a batch
    retried after a worker failure overwrites its own file instead of adding a copy."""
    path = f"{folder.rstrip('/')}/{name}.parquet"
    if is_uri(folder):  # an object store publishes the file whole on close
        with storage.open_write(path) as f:
            pq.write_table(table, f)
        return path
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def split_of(path: str) -> str:
    """segmented/<split>/part.parquet -> <split>."""
    return path.rstrip("/").split("/")[-2]


class ShardEncoder:
    """Ray Data actor: encode a batch of segmented rows, write its shards, return counts.

    Characters and content tokens (for tokens/char) are counted on `measure_split` only.
    """

    def __init__(self, tokenizer, context_length: int, loss_on: str, tokens_dir: str, measure_split: str | None):
        self.fmt = DialogueFormat(tokenizer, context_length, loss_on)
        self.tokens_dir = tokens_dir.rstrip("/")
        self.measure_split = measure_split

    def __call__(self, batch: pa.Table) -> pa.Table:
        splits = [split_of(p) for p in batch.column("path").to_pylist()]
        rows = []
        for split in sorted(set(splits)):
            part = batch.filter(pa.array([s == split for s in splits]))
            turns = part.column("turns").to_pylist()
            systems = part.column("system").to_pylist() if "system" in part.column_names else [""] * len(turns)
            shard = encode_rows(turns, systems, self.fmt)
            ids = part.column("id").to_pylist() if "id" in part.column_names else []
            name = hashlib.blake2b(json.dumps([split, ids, turns], ensure_ascii=False).encode("utf-8"),
                                   digest_size=12).hexdigest()
            if shard.num_rows:
                write_shard(shard, f"{self.tokens_dir}/{split}", name)
            counts = {"split": split, "dialogues": part.num_rows, **count_tokens(shard), "chars": 0, "text_tokens": 0}
            if split == self.measure_split:
                texts = [x for t in turns for x in (t or []) if x]
                counts["chars"] = sum(map(len, texts))
                counts["text_tokens"] = sum(map(len, self.fmt.encode_texts(texts))) if texts else 0
            rows.append(counts)
        return pa.Table.from_pylist(rows, schema=pa.schema([("split", pa.string())] + [(c, pa.int64()) for c in COUNTS]))


def encode_splits(segmented_dir: str, tokens_dir: str, tokenizer, fmt_cfg: FormatConfig,
                  splits: Iterable[str] = SPLITS, measure_split: str | None = "validation") -> dict[str, dict[str, int]]:
    """Encode segmented/{split}/*.parquet into tokens/{split}/*.parquet in one Ray Data pass.

    Returns counts per split (dialogues, sequences, tokens, loss_tokens; chars and
    text_tokens on measure_split). `tokenizer` is a transformers fast tokenizer, shipped to
    each actor once.
    """
    import ray

    from .manifest import list_parquet

    splits = list(splits)
    totals = {s: dict.fromkeys(COUNTS, 0) for s in splits}
    files = [f for s in splits for f in list_parquet(f"{segmented_dir.rstrip('/')}/{s}")]
    if not files:
        return totals
    ds = ray.data.read_parquet(files, columns=["id", "turns", "system"], include_paths=True)
    stats = ds.map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"tokenizer": tokenizer, "context_length": fmt_cfg.context_length,
                               "loss_on": fmt_cfg.loss_on, "tokens_dir": tokens_dir, "measure_split": measure_split},
        batch_size=BATCH_ROWS, batch_format="pyarrow", compute=_actors(),
    ).take_all()
    for row in stats:
        for c in COUNTS:
            totals[row["split"]][c] += int(row[c])
    return totals


def tokens_per_char(counts: dict[str, int]) -> float:
    return round(counts["text_tokens"] / counts["chars"], 4) if counts.get("chars") else 0.0


def _actors():
    import ray

    from zhchat.runtime import cluster_cpus

    # Leave a CPU for reading, or the actors starve the read operator (RAY_NOTES).
    return ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cluster_cpus() - 1))
