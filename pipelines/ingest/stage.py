"""The Ray Data job: chunks -> parsed rows -> Parquet, in one streaming pass.

    from_items(tasks of chunks) -> map_batches(parse_units) -> write_parquet(OUT/dialogues)
                                   `-- per task, on the side: quarantine/<task>.parquet, stats/<task>.json

One parse yields two tables of different schemas plus counts. The dialogues (the bulk) go
through write_parquet; each task streams its few quarantined records to its own Parquet file
and its counts to a JSON file, which are moved into OUT/quarantine and summed afterwards.
A second Ray Data pass (read back, filter, write) cost more than the whole parse on small
inputs here. Side files are named after their task, so a retried task overwrites its own
files instead of adding to them. Memory is bounded by chunk size x parallel tasks.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from zhchat import storage
from zhchat.tables import DIALOGUE_SCHEMA, QUARANTINE_SCHEMA

from .chunks import pack_chunks, read_chunk

BATCH_ROWS = 8192


class _SideWriter:
    """Quarantine rows of one task, streamed to its own Parquet file (opened on first row)."""

    def __init__(self, path: str | None):
        self.path, self.rows, self.file, self.writer = path, [], None, None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.path is None:  # counting only
            self.rows = []
        if not self.rows:
            return
        if self.writer is None:
            self.file = storage.open_write(self.path)
            self.writer = pq.ParquetWriter(self.file, QUARANTINE_SCHEMA)
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA))
        self.rows = []

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.file.close()


def parse_chunks(chunks: list[dict], name: str, side: str | None = None,
                 batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Dialogue tables for a task's chunks; quarantine rows and per-chunk counts go to `side`
    as `quarantine/<name>.parquet` and `stats/<name>.json` (side=None: nothing is written)."""
    bad = _SideWriter(f"{side}/quarantine/{name}.parquet" if side else None)
    stats = []
    rows: list[dict] = []
    try:
        for chunk in chunks:
            counts = {"file": chunk["path"], "read": 0, "kept": 0, "skipped": 0, "quarantined": 0}
            skipped: Counter[str] = Counter()
            for kind, value in read_chunk(chunk):
                counts["read"] += 1
                if kind == "ok":
                    counts["kept"] += 1
                    rows.append(value)
                    if len(rows) >= batch_rows:
                        yield pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)
                        rows = []
                elif kind == "skip":
                    counts["skipped"] += 1
                    skipped[value] += 1
                else:
                    counts["quarantined"] += 1
                    bad.add(value)
            stats.append({**counts, "skipped_reasons": dict(skipped)})
        if rows:
            yield pa.Table.from_pylist(rows, schema=DIALOGUE_SCHEMA)
    finally:
        bad.close()
    if side:
        with storage.open_write(f"{side}/stats/{name}.json") as f:
            f.write(json.dumps(stats, ensure_ascii=False).encode("utf-8"))


def parse_units(batch: pa.Table, side: str) -> Iterator[pa.Table]:
    """map_batches wrapper: task descriptions (index + chunks as JSON) in, dialogue tables out."""
    for unit in batch.to_pylist():
        yield from parse_chunks(json.loads(unit["chunks"]), f"unit-{unit['index']:06d}", side)


def _parquet_files(path: str) -> list[str]:
    return [f for f in storage.list_files(path, recursive=True) if f.endswith(".parquet")]


def _ensure_table(path: str, schema: pa.Schema) -> None:
    """An empty table still gets one (empty) file, so readers find the schema."""
    if _parquet_files(path):
        return
    with storage.open_write(storage.join(path, "empty.parquet")) as f:
        pq.write_table(schema.empty_table(), f)


def _merge_counts(stats: list[dict]) -> dict[str, dict]:
    per_file: dict[str, dict] = {}
    for s in stats:
        f = per_file.setdefault(s["file"], {"read": 0, "kept": 0, "skipped": 0, "quarantined": 0,
                                            "skipped_reasons": {}, "chunks": 0})
        for k in ("read", "kept", "skipped", "quarantined"):
            f[k] += s[k]
        for reason, n in s["skipped_reasons"].items():
            f["skipped_reasons"][reason] = f["skipped_reasons"].get(reason, 0) + n
        f["chunks"] += 1
    return per_file


def run_job(chunks: list[dict], out: str, chunk_bytes: int = 32 << 20) -> dict[str, dict]:
    """Parse every chunk on Ray Data and write OUT/dialogues and OUT/quarantine.

    A rerun replaces both tables (they are removed first), so nothing is appended twice.
    Returns per-file counts: {path: {read, kept, skipped, quarantined, skipped_reasons, chunks}}.
    """
    import ray

    out = out.rstrip("/")
    side, dialogues, quarantine = f"{out}/.side", f"{out}/dialogues", f"{out}/quarantine"
    for p in (side, dialogues, quarantine):
        storage.remove(p)
    units = [{"index": i, "chunks": json.dumps(u)} for i, u in enumerate(pack_chunks(chunks, chunk_bytes))]

    # One block per task unit, so units are parsed in parallel, one per task at a time.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(parse_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"side": side})
    ds.write_parquet(dialogues)

    if _parquet_files(f"{side}/quarantine"):
        # Already Parquet with QUARANTINE_SCHEMA, one file per task: moved, not rewritten.
        storage.move_folder(f"{side}/quarantine", quarantine)
    _ensure_table(dialogues, DIALOGUE_SCHEMA)
    _ensure_table(quarantine, QUARANTINE_SCHEMA)

    stats = [s for f in storage.list_files(f"{side}/stats") for s in json.loads(storage.read_text(f))]
    if len(stats) != len(chunks):  # a task that died for good fails the Ray job before this
        raise RuntimeError(f"ingest: {len(chunks) - len(stats)} of {len(chunks)} chunks left no counts in {side}/stats")
    storage.remove(side)
    return _merge_counts(stats)
