"""Fetched bytes -> decoded text, in-scope links and dialogue turns, and the Ray Data UDF
that fetches a batch and processes each page as it arrives.

One row in, one row out (RESULT_SCHEMA); the driver splits it into the pages, dialogues and
errors tables.
"""

from __future__ import annotations

import asyncio

import pyarrow as pa
from selectolax.lexbor import LexborHTMLParser

from zhchat.config import CrawlConfig

from .decode import decode_body
from .extract import main_text, meta_robots, page_links, thread_turns
from .fetch import fetch_many
from .limiter import ActorLimiter, lookup_limiter
from .robots import Robots
from .urls import in_scope, origin_of

RESULT_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("depth", pa.int32()),
    ("final_url", pa.string()),
    ("status", pa.int32()),
    ("outcome", pa.string()),          # ok | redirected | noindex | error
    ("content_type", pa.string()),
    ("charset", pa.string()),
    ("charset_declared", pa.string()),
    ("charset_mismatch", pa.bool_()),
    ("fetched_at", pa.timestamp("ms", tz="UTC")),
    ("bytes", pa.int64()),
    ("text", pa.string()),
    ("links", pa.list_(pa.string())),  # in scope, normalised; robots is checked by the driver
    ("links_offsite", pa.int32()),
    ("links_bad_scheme", pa.int32()),
    ("turns", pa.list_(pa.string())),  # thread dialogue turns; empty if none
    ("error_kind", pa.string()),
    ("message", pa.string()),
    ("attempts", pa.int32()),
])


def task_limiter_and_rules(cfg: CrawlConfig, crawl_id: str, robots: dict[str, dict]):
    """Inside a Ray task: the crawl's limiter client and the robots check for redirects."""
    rules = {origin: Robots.from_state(s, cfg.user_agent) for origin, s in robots.items()}

    def allowed(url: str) -> bool:
        r = rules.get(origin_of(url))
        return r is None or r.allowed(url)

    return ActorLimiter(lookup_limiter(crawl_id)), allowed


def process_row(row: dict, cfg: CrawlConfig, allowed: list[str], exact_hosts: list[str]) -> dict:
    out = {k: row.get(k) for k in ("url", "depth", "final_url", "status", "content_type", "fetched_at",
                                     "error_kind", "message", "attempts")}
    out.update(outcome="ok", charset="", charset_declared="", charset_mismatch=False, bytes=len(row["body"] or b""),
               text="", links=[], links_offsite=0, links_bad_scheme=0, turns=[])
    if row["error_kind"]:
        out["outcome"] = "error"
        return out
    if row["redirect_to"]:
        out["outcome"] = "redirected"
        target = row["redirect_to"]
        if in_scope(target, allowed, exact_hosts):
            out["links"] = [target]
        else:
            out["links_offsite"] = 1
        return out
    try:
        mime = (row["content_type"] or "text/html").split(";")[0].strip().lower()
        is_html = mime != "text/plain"
        dec = decode_body(row["body"], row["content_type"] or "", is_html=is_html)
        out.update(charset=dec.charset, charset_declared=dec.declared, charset_mismatch=dec.mismatch)
        url = row["final_url"]
        if not is_html:
            out["text"] = dec.text.strip()
            return out
        tree = LexborHTMLParser(dec.text)
        directives = meta_robots(tree)
        if "nofollow" not in directives:
            links = page_links(tree, url)
            out["links"] = [u for u in links.urls if in_scope(u, allowed, exact_hosts)]
            out["links_offsite"] = len(links.urls) - len(out["links"])
            out["links_bad_scheme"] = links.bad_scheme
        if "noindex" in directives:
            out["outcome"] = "noindex"  # fetched and followed, but its content is not kept
            return out
        turns = thread_turns(tree, url, cfg.selectors) if cfg.selectors else None
        out["turns"] = turns or []
        out["text"] = main_text(dec.text, url, fast=cfg.extract_fast)
    except Exception as e:  # a page that breaks a parser is recorded, never fatal
        out.update(outcome="error", error_kind="extract", message=f"{type(e).__name__}: {e}"[:2000],
                   text="", turns=[], links=[])
    return out


def crawl_batch(batch: pa.Table, *, cfg: CrawlConfig, crawl_id: str, robots: dict[str, dict],
                allowed: list[str], exact_hosts: list[str]) -> pa.Table:
    """Ray Data UDF: {url, depth} rows -> RESULT_SCHEMA rows. Fetching (I/O) and processing
    (CPU) share one task: each page is processed the moment its body arrives."""
    limiter, robots_ok = task_limiter_and_rules(cfg, crawl_id, robots)
    rows = asyncio.run(fetch_many(batch.select(["url", "depth"]).to_pylist(), cfg, limiter, robots_ok,
                                  then=lambda row: process_row(row, cfg, allowed, exact_hosts)))
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
