"""Training data: the preprocess output folder, Ray Data readers, and batch collation.

DATA/tokens/{split}/*.parquet rows hold `input_ids` and `labels` (HF convention: aligned,
-100 where there is no loss; the shift happens in the loss). Rows are variable length
(dialogues) or exactly context_length (packed text).

The order a worker sees is deterministic given (seed, epoch, rank): Ray Data reads files
in order (preserve_order, set by the trainer), the streaming split hands blocks to the
worker with the fewest rows so far, and a seeded local shuffle buffer mixes them. Resume
replays that order and skips the batches already trained on.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from zhchat.dialogue import IGNORE_INDEX
from zhchat.storage import exists, join

SPLITS = ("train", "validation", "test")


def split_dir(data_dir: str, split: str, kind: str = "tokens") -> str:
    return join(data_dir, kind, split)


def read_split(data_dir: str, split: str, kind: str = "tokens", columns: list[str] | None = None,
               min_blocks: int = 1):
    """A Ray Dataset over one split's Parquet files (local path or cloud URI), in at least
    `min_blocks` blocks (a pool of N actors downstream has work for N only with N blocks)."""
    import ray

    path = split_dir(data_dir, split, kind)
    if not exists(path):
        raise FileNotFoundError(f"{path} does not exist; re-run `zhchat preprocess`")
    from pipelines.manifest import list_parquet

    files = list_parquet(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no Parquet files; re-run `zhchat preprocess`")
    # Reading is I/O-light: a fraction of a CPU per read task keeps it schedulable next to
    # training workers that hold whole CPUs (the 2-CPU deadlock in RAY_NOTES). One block per
    # shard: Ray's default cuts a small split into >= 200 blocks of a few rows, and every
    # block costs the training loop a fetch (0.78x a bare loop instead of 0.9x, bench/train.py).
    ds = ray.data.read_parquet(files, columns=columns or ["input_ids", "labels"], num_cpus=0.25,
                               override_num_blocks=len(files))
    # Fewer shards than blocks asked for (a small split): cut them up (a barrier, but over
    # fewer shards than actors, so a small one).
    return ds.repartition(min_blocks) if len(files) < min_blocks else ds


# -- plain functions on batches ----------------------------------------------------------------


def collate(batch: dict, pad_id: int) -> dict:
    """Rows of ragged `input_ids`/`labels` -> right-padded int64 arrays [B, T], T = longest row.

    Padding gets label -100. No attention mask is needed: padding is on the right and
    attention is causal, so real tokens never see it.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    if len(ids) == 0:
        raise ValueError("empty batch")
    lengths = [len(x) for x in ids]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if len(a) != len(b):
            raise ValueError(f"row {i}: input_ids has {len(a)} tokens but labels {len(b)}")
    t = max(lengths)
    out_ids = np.full((len(ids), t), pad_id, dtype=np.int64)       # [B, T]
    out_labels = np.full((len(ids), t), IGNORE_INDEX, dtype=np.int64)  # [B, T]
    for i, (a, b) in enumerate(zip(ids, labels)):
        out_ids[i, : len(a)] = a
        out_labels[i, : len(b)] = b
    return {"input_ids": out_ids, "labels": out_labels, "lengths": np.asarray(lengths, dtype=np.int64)}


def count_targets(labels: np.ndarray) -> int:
    """Tokens that carry loss after the shift (labels[:, 1:] != -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def micro_batches(batch: dict, micro: int) -> list[dict]:
    """Split a collated step batch into chunks of at most `micro` rows, each cut to its longest row.

    Rows are grouped by length first: the step's gradient is a sum over its rows, so the
    grouping changes nothing but the padding computed.
    """
    order = np.argsort(batch["lengths"], kind="stable")
    out = []
    for s in range(0, len(order), micro):
        rows = order[s : s + micro]
        width = int(batch["lengths"][rows].max())
        out.append({k: batch[k][rows, :width] for k in ("input_ids", "labels")})
    return out


def epoch_batches(stream, epoch: int, seed: int, rank: int, world: int, global_batch: int, shuffle_buffer: int,
                  skip: int = 0, prefetch: int = 2) -> Iterator[dict]:
    """One epoch of this worker's share of each global batch (ragged numpy rows), the
    first `skip` global batches dropped.

    Every worker reads the same stream (the train dataset is not split between workers,
    see trainer.py) with a shuffle seeded by (seed, epoch) alone, so the k-th global batch
    of an epoch holds the same rows at every worker count, and worker r takes rows
    [r*G/w, (r+1)*G/w) of it. A run resized from 2 workers to 1 mid-epoch therefore goes on
    at the same global sample: no row is used twice or skipped within the epoch. drop_last
    gives every worker the same number of steps, so DDP never waits for one that ran out.
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} workers")
    per = global_batch // world
    kwargs = {}
    if shuffle_buffer > 0:
        kwargs = dict(local_shuffle_buffer_size=max(shuffle_buffer, global_batch),
                      local_shuffle_seed=(seed * 1_000_003 + epoch * 1_009) % (2**31))
    it = stream.iter_batches(batch_size=global_batch, batch_format="numpy", drop_last=True,
                             prefetch_batches=prefetch, **kwargs)
    for i, batch in enumerate(it):
        if i >= skip:
            yield {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def row_ids(batch: dict) -> list[int]:
    """A stable id per row (crc32 of its input_ids), for the row-use log tests enable."""
    import zlib

    return [zlib.crc32(np.asarray(r, dtype=np.int32).tobytes()) for r in batch["input_ids"]]
