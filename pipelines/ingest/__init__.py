"""`zhchat ingest`: dialogue files in the formats users bring -> one Parquet dialogue table.

    files/folders -> detect the format per file -> byte-range chunks -> Ray Data parse -> Parquet
    OUT/dialogues/*.parquet   (zhchat.tables.DIALOGUE_SCHEMA)
    OUT/quarantine/*.parquet  (QUARANTINE_SCHEMA: every record that could not be used, and why)
    OUT/summary.json          (per file: format, how it was chosen, read/kept/skipped/quarantined)
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
import zlib
from typing import Any

from zhchat import storage
from zhchat.config import RunConfig
from zhchat.report import say, summary_table

from .chunks import display_path, list_files, make_chunk, read_head, split_file
from .detect import detect, layout_for

__all__ = ["run_ingest", "plan_inputs"]

# One document per line or per file: either reading of plain text is legitimate.
PLAIN_TEXT = {"text_lines", "text_file"}
# Per-file lines on the terminal stop here; summary.json always has every file.
MAX_LISTED = 200


def _local_abs(path: str) -> str:
    """Workers may run in another directory: hand them absolute local paths."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def plan_inputs(inputs: list[str], fmt: str, chunk_bytes: int) -> tuple[list[dict], dict[str, dict]]:
    """Chunks to parse and, per file, the format used and how it was chosen.

    A file whose format cannot be detected, or that cannot be opened, becomes a chunk that
    quarantines it with the reason, so it shows in the counts instead of vanishing.
    """
    files = list_files([_local_abs(p) for p in inputs])
    if not files:
        raise ValueError(f"no input files found in {', '.join(inputs)} (hidden files are skipped)")
    chunks: list[dict] = []
    info: dict[str, dict] = {}
    mismatched: dict[str, list[str]] = {}
    for path in files:
        try:
            head, complete, compressed = read_head(path)
        except (OSError, EOFError, zlib.error) as e:
            info[path] = {"format": None, "layout": "", "chosen": "unreadable", "why": str(e)}
            chunks.append(make_chunk(path, "", "", error=f"the file could not be opened or decompressed: {e}"))
            continue
        found = detect(path, head, complete)
        if fmt == "auto":
            info[path] = {"format": found.format, "layout": found.layout, "chosen": "detected", "why": found.why}
            if found.format is None:
                chunks.append(make_chunk(path, "", "", compressed, error=f"could not detect the format: {found.why} "
                                         "(give --format to read it anyway)"))
                continue
            use_fmt, layout = found.format, found.layout
        else:
            layout, how = layout_for(fmt, head)
            use_fmt = fmt
            info[path] = {"format": fmt, "layout": layout, "chosen": how, "why": ""}
            if found.format not in (fmt, None) and head.strip() and {fmt, found.format} != PLAIN_TEXT:
                info[path]["why"] = f"looks like {found.format} ({found.why})"
                mismatched.setdefault(found.format, []).append(path)
        chunks.extend(split_file(path, use_fmt, layout, chunk_bytes, compressed))
    for looks, paths in mismatched.items():
        say(f"[yellow]ingest: {len(paths)} file(s) given as {fmt} look like {looks}, "
            f"e.g. {display_path(paths[0])} ({info[paths[0]]['why']})[/yellow]")
    return chunks, info


def _totals(files: dict[str, dict]) -> dict[str, int]:
    return {k: sum(f[k] for f in files.values()) for k in ("read", "kept", "skipped", "quarantined")}


def run_ingest(cfg: RunConfig, args: Any = None) -> dict:
    """Import cfg.ingest.inputs into cfg.ingest.out; returns (and writes) the per-file summary."""
    from zhchat.runtime import init_ray

    from .stage import run_job

    ic = cfg.ingest
    if not ic.inputs:
        raise ValueError("no inputs: give files or folders (zhchat ingest PATH ...) or ingest.inputs in the config")
    out = _local_abs(ic.out or cfg.path("ingest"))
    t0 = time.time()
    chunks, info = plan_inputs(ic.inputs, ic.format, ic.chunk_mb << 20)
    say(f"ingest: {len(info)} file(s), {len(chunks)} chunk(s) -> {display_path(out)}")
    if ic.format == "auto":
        for path, i in list(info.items())[:20]:
            say(f"  {display_path(path)}: {i['format'] or 'unknown'} ({i['why']})")
        if len(info) > 20:
            by_format = Counter(i["format"] or "unknown" for i in info.values())
            say(f"  ... all {len(info):,} files: " + ", ".join(f"{n:,} {f}" for f, n in by_format.most_common()))

    init_ray(cfg.ray)
    counts = run_job(chunks, out, ic.chunk_mb << 20)

    files: dict[str, dict] = {}
    for path, i in info.items():
        c = counts.get(path, {"read": 0, "kept": 0, "skipped": 0, "quarantined": 0, "skipped_reasons": {}, "chunks": 0})
        files[path] = {**i, **c}
    totals = _totals(files)
    summary = {
        "stage": "ingest", "out": out,
        "dialogues": f"{out}/dialogues", "quarantine": f"{out}/quarantine",
        "files": files, "totals": totals, "chunks": len(chunks),
        "seconds": round(time.time() - t0, 2),
    }
    storage.write_text(f"{out}/summary.json", json.dumps(summary, ensure_ascii=False, indent=2))

    rows = [(display_path(p), f["format"] or "?", f["chosen"], f["read"], f["kept"], f["skipped"], f["quarantined"])
            for p, f in list(files.items())[:MAX_LISTED]]
    if len(files) > MAX_LISTED:
        rows.append((f"... {len(files) - MAX_LISTED:,} more files (see summary.json)", "", "", "", "", "", ""))
    rows.append(("total", "", "", totals["read"], totals["kept"], totals["skipped"], totals["quarantined"]))
    summary_table("ingest", ["file", "format", "chosen", "read", "kept", "skipped", "quarantined"], rows)
    if totals["quarantined"]:
        say(f"ingest: {totals['quarantined']:,} record(s) quarantined with their reasons in {display_path(out)}/quarantine")
    return summary
