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

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

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
            self.file = fsspec.open(self.path, "wb", auto_mkdir=True).open()
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
        with fsspec.open(f"{side}/stats/{name}.json", "w", auto_mkdir=True) as f:
            json.dump(stats, f, ensure_ascii=False)


def parse_units(batch: pa.Table, side: str) -> Iterator[pa.Table]:
    """map_batches wrapper: task descriptions (index + chunks as JSON) in, dialogue tables out."""
    for unit in batch.to_pylist():
        yield from parse_chunks(json.loads(unit["chunks"]), f"unit-{unit['index']:06d}", side)


def _remove(path: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def _parquet_files(path: str) -> list[str]:
    fs, p = fsspec.core.url_to_fs(path)
    return [f for f in fs.find(p) if f.endswith(".parquet")] if fs.exists(p) else []


def _ensure_table(path: str, schema: pa.Schema) -> None:
    """An empty table still gets one (empty) file, so readers find the schema."""
    if _parquet_files(path):
        return
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p, exist_ok=True)
    with fs.open(f"{p.rstrip('/')}/empty.parquet", "wb") as f:
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
        _remove(p)
    units = [{"index": i, "chunks": json.dumps(u)} for i, u in enumerate(pack_chunks(chunks, chunk_bytes))]

    # One block per task unit, so units are parsed in parallel, one per task at a time.
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(parse_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"side": side})
    ds.write_parquet(dialogues)

    if _parquet_files(f"{side}/quarantine"):
        # Already Parquet with QUARANTINE_SCHEMA, one file per task: moved, not rewritten.
        fs, p = fsspec.core.url_to_fs(f"{side}/quarantine")
        fs.mv(p, fsspec.core.url_to_fs(quarantine)[1], recursive=True)
    _ensure_table(dialogues, DIALOGUE_SCHEMA)
    _ensure_table(quarantine, QUARANTINE_SCHEMA)

    fs, p = fsspec.core.url_to_fs(f"{side}/stats")
    stats = [s for f in sorted(fs.find(p)) for s in json.loads(fs.cat_file(f))] if fs.exists(p) else []
    if len(stats) != len(chunks):  # a task that died for good fails the Ray job before this
        raise RuntimeError(f"ingest: {len(chunks) - len(stats)} of {len(chunks)} chunks left no counts in {side}/stats")
    _remove(side)
    return _merge_counts(stats)
