"""The crawl's output folder, written so that a crash loses at most the pages in flight.

OUT/pages/part-*.parquet       one row per fetched URL (and its in-scope links: the frontier)
OUT/dialogues/part-*.parquet   DIALOGUE_SCHEMA rows (threads, and text pages as one-turn rows)
OUT/errors/part-*.parquet      one row per URL that failed or was skipped by robots.txt
OUT/state/crawl.json           counts and settings of the last run (for people; resume does not need it)

Each batch of results becomes one part in each table, same part name. Parts are written to a
temporary name and renamed; the pages part is renamed last and is the commit mark: on start,
dialogues/errors parts without their pages part are removed (their URLs will be fetched again).
The frontier is not a separate mutable file: it is derived from the pages' links on start.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from zhchat.storage import filesystem
from zhchat.tables import DIALOGUE_SCHEMA, dialogue_row

from .process import RESULT_SCHEMA

# The pages table is the fetch result minus what goes to the dialogue and errors tables.
PAGES_SCHEMA = pa.schema([RESULT_SCHEMA.field(name) for name in (
    "url", "final_url", "depth", "status", "outcome", "content_type", "charset", "charset_declared",
    "charset_mismatch", "fetched_at", "bytes", "text", "links",
)])

ERRORS_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("depth", pa.int32()),
    ("kind", pa.string()),
    ("status", pa.int32()),
    ("attempts", pa.int32()),
    ("message", pa.string()),
    ("fetched_at", pa.timestamp("ms", tz="UTC")),
])

# Error kinds that are decisions, not fetches: they do not spend the page budget.
SKIP_KINDS = ("robots_disallowed", "robots_unavailable")
TABLES = ("pages", "dialogues", "errors")


@dataclass
class Prior:
    """What earlier runs left: URLs done, links found (url -> depth), budget spent."""

    done: set[str] = field(default_factory=set)
    links: dict[str, int] = field(default_factory=dict)
    fetched: int = 0
    pages: int = 0
    errors: int = 0


def split_results(res: pa.Table, text_rows: bool, min_text_chars: int) -> tuple[list[dict], list[dict], list[dict]]:
    """RESULT_SCHEMA rows -> (pages, dialogues, errors) rows."""
    pages, dialogues, errors = [], [], []
    for r in res.to_pylist():
        if r["outcome"] == "error":
            errors.append({"url": r["url"], "depth": r["depth"], "kind": r["error_kind"], "status": r["status"],
                           "attempts": r["attempts"], "message": r["message"], "fetched_at": r["fetched_at"]})
            continue
        pages.append({k: r[k] for k in PAGES_SCHEMA.names})
        if r["turns"]:
            dialogues.append(dialogue_row(r["turns"], source=r["final_url"]))
        elif text_rows and r["outcome"] == "ok" and len(r["text"]) >= max(1, min_text_chars):
            dialogues.append(dialogue_row([r["text"]], source=r["final_url"]))
    return pages, dialogues, errors


class CrawlStore:
    def __init__(self, out: str):
        self.fs, self.root = filesystem(out)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        for d in (*TABLES, "state"):
            self.fs.create_dir(f"{self.root}/{d}", recursive=True)
        # Time for order, a nonce for uniqueness: two runs in the same second from one process
        # (a resume right after a short crawl) must never reuse, and so overwrite, a part name.
        self.run = time.strftime("%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:8]}"
        self.seq = 0

    def _parts(self, table: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File)

    def cleanup(self) -> int:
        """Remove temporaries and parts of batches whose commit (the pages part) never happened."""
        committed = {os.path.basename(p) for p in self._parts("pages") if p.endswith(".parquet")}
        removed = 0
        for table in TABLES:
            for p in self._parts(table):
                name = os.path.basename(p)
                if name.endswith(".tmp") or (table != "pages" and name not in committed):
                    self.fs.delete_file(p)
                    removed += 1
        return removed

    def load(self) -> Prior:
        prior = Prior()
        for p in self._parts("pages"):
            t = pq.read_table(p, filesystem=self.fs, columns=["url", "final_url", "depth", "outcome", "links"])
            for url, final, depth, outcome, links in zip(*(t.column(c).to_pylist() for c in t.column_names)):
                prior.done.update((url, final))
                # A redirect's target is the same page: same depth. A page's links are one hop further.
                d = depth if outcome == "redirected" else depth + 1
                for link in links or ():
                    if d < prior.links.get(link, 1 << 30):
                        prior.links[link] = d
            prior.pages += t.num_rows
        for p in self._parts("errors"):
            t = pq.read_table(p, filesystem=self.fs, columns=["url", "kind"])
            prior.done.update(t.column("url").to_pylist())
            kinds = t.column("kind").to_pylist()
            prior.errors += len(kinds)
            prior.fetched += sum(k not in SKIP_KINDS for k in kinds)
        prior.fetched += prior.pages
        return prior

    def _write(self, table: str, name: str, rows: list[dict], schema: pa.Schema) -> None:
        path = f"{self.root}/{table}/{name}"
        data = pa.Table.from_pylist(rows, schema=schema)
        if not self.local:  # object stores: one PUT is atomic already
            pq.write_table(data, path, filesystem=self.fs)
            return
        pq.write_table(data, path + ".tmp", filesystem=self.fs)
        self.fs.move(path + ".tmp", path)

    def write_batch(self, pages: list[dict], dialogues: list[dict], errors: list[dict]) -> str:
        """One batch's parts; the pages part (possibly empty) goes last as the commit mark."""
        self.seq += 1
        name = f"part-{self.run}-{self.seq:05d}.parquet"
        if dialogues:
            self._write("dialogues", name, dialogues, DIALOGUE_SCHEMA)
        if errors:
            self._write("errors", name, errors, ERRORS_SCHEMA)
        self._write("pages", name, pages, PAGES_SCHEMA)
        return name

    def write_state(self, state: dict) -> None:
        path = f"{self.root}/state/crawl.json"
        data = json.dumps(state, ensure_ascii=False, indent=1, default=str).encode("utf-8")
        tmp = path + (".tmp" if self.local else "")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if self.local:
            self.fs.move(tmp, path)
