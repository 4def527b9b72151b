"""The crawl driver: rounds of Ray Data fetches over the frontier, written as they stream in.

Each round takes the shallowest pending URLs (up to the page budget), checks them against
robots.txt (fetched once per origin, Crawl-delay handed to the limiter), and runs
    from_items(urls) -> map_batches(crawl_batch)   (fetch, then process each page as it arrives)
on the cluster. Results are written batch by batch as Ray Data yields them, and their links
feed the next round, which starts as soon as they fill a wave of tasks (up to two rounds run
at once, so one level's slow tail does not stall the crawl). All politeness state that must be shared lives in the limiter actor.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import Counter

import pyarrow as pa

from zhchat.config import CrawlConfig
from zhchat.report import say, summary_table

from .limiter import ActorLimiter, get_or_create_limiter, limiter_name, stop_limiter
from .frontier import Frontier
from .output import SKIP_KINDS, CrawlStore, split_results
from .robots import Robots, fetch_robots
from .process import crawl_batch
from .urls import BadURL, host_of, normalize_url, origin_of


def crawl_id_for(out: str) -> str:
    """The output folder's hash plus a per-run nonce: each run (driver) gets a fresh limiter, so a
    rerun right after a killed driver never meets the dead run's actor under the same name."""
    digest = hashlib.blake2b(os.path.abspath(out).encode(), digest_size=6).hexdigest()
    return f"{digest}-{uuid.uuid4().hex[:8]}"


class Progress:
    """One line on stderr every `every_s`: fetched, queued, failed, rate, per-host request rate."""

    def __init__(self, limiter, every_s: float = 2.0, enabled: bool = True):
        self.limiter, self.every_s, self.enabled = limiter, every_s, enabled
        self.t0 = self.last = time.monotonic()

    def maybe(self, counts: Counter, queued: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        import ray

        try:
            stats = ray.get(self.limiter.stats.remote(), timeout=2)
        except Exception:  # progress must never stop the crawl
            stats = {}
        busiest = sorted(stats.items(), key=lambda kv: -kv[1]["rate"])[:3]
        hosts = ", ".join(f"{h} {s['rate']:.1f}/s ({s['in_flight']} in flight)" for h, s in busiest)
        fetched = counts["fetched"]
        say(f"crawl: {fetched:,} fetched, {counts['error']:,} failed, {queued:,} queued, "
            f"{fetched / max(now - self.t0, 1e-9):.1f} pages/s" + (f" | {hosts}" if hosts else ""))


def _robots_rows(urls: list[tuple[str, int]], robots: dict[str, Robots]) -> tuple[list[tuple[str, int]], list[dict]]:
    from datetime import datetime, timezone

    keep, skipped = [], []
    now = datetime.now(timezone.utc)
    for url, depth in urls:
        r = robots.get(origin_of(url))
        if r is None or r.allowed(url):
            keep.append((url, depth))
            continue
        kind = "robots_unavailable" if r.deny_all else "robots_disallowed"
        msg = r.reason if r.deny_all else f"disallowed by {origin_of(url)}/robots.txt"
        skipped.append({"url": url, "depth": depth, "kind": kind, "status": 0, "attempts": 0,
                        "message": msg, "fetched_at": now})
    return keep, skipped


def crawl(cfg: CrawlConfig, out: str, progress: bool = True) -> dict:
    import ray

    from zhchat.runtime import init_ray

    if not cfg.seeds:
        raise ValueError("crawl: no seeds; give --seed URL or crawl.seeds in the config")
    try:
        seeds = [normalize_url(s) for s in cfg.seeds]
    except BadURL as e:
        raise ValueError(f"crawl: bad seed: {e}") from None
    allowed = list(cfg.allowed_domains)
    exact_hosts = [] if allowed else sorted({host_of(s) for s in seeds})
    init_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress line says more about a crawl
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    store = CrawlStore(out)
    removed = store.cleanup()
    prior = store.load()
    frontier = Frontier(cfg.max_depth, prior.done)
    for s in seeds:
        frontier.add(s, 0)
    for url, depth in prior.links.items():
        frontier.add(url, depth)
    if prior.fetched or removed:
        say(f"crawl: resuming {out}: {prior.pages:,} pages and {prior.errors:,} errors already there, "
            f"{len(frontier):,} URLs queued" + (f", {removed} uncommitted parts removed" if removed else ""))

    crawl_id = crawl_id_for(out)
    lease_ttl = cfg.page_timeout_s + cfg.connect_timeout_s + 5
    handle = get_or_create_limiter(crawl_id, cfg.per_host_concurrency, cfg.per_host_rps, lease_ttl)
    limiter = ActorLimiter(handle)
    robots: dict[str, Robots] = {}
    counts: Counter = Counter()
    outcomes: Counter = Counter()
    bar = Progress(handle, enabled=progress)
    t0 = time.monotonic()
    spent = prior.fetched
    rounds = 0
    results: queue.Queue = queue.Queue()
    active = 0      # rounds running on the cluster
    launched = 0    # URLs handed to running rounds and not back yet
    wave = cfg.workers * cfg.batch_size

    def admit(batch: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Fetch robots.txt of new origins, hand Crawl-delays to the limiter, drop what robots forbid."""
        if not cfg.obey_robots:
            return batch
        new = sorted({origin_of(u) for u, _ in batch} - robots.keys())
        if new:
            robots.update(asyncio.run(fetch_robots(new, cfg, limiter)))
            for origin in new:
                delay = robots[origin].crawl_delay()
                if delay:
                    ray.get(handle.set_crawl_delay.remote(host_of(origin), min(delay, cfg.max_crawl_delay_s)))
        batch, skipped = _robots_rows(batch, robots)
        if skipped:
            store.write_batch([], [], skipped)
            frontier.finish(*(r["url"] for r in skipped))
            outcomes.update(r["kind"] for r in skipped)
        return batch

    try:
        while True:
            # Start a round when the frontier fills a wave of tasks, or when nothing runs. Rounds
            # overlap, so a slow page (timeouts, retries) at the end of one level never holds up the next.
            while (len(frontier) and active < _MAX_ROUNDS and cfg.max_pages - spent - launched > 0
                   and (active == 0 or len(frontier) >= wave)):
                batch = admit(frontier.take(cfg.max_pages - spent - launched))
                if batch:
                    args = (batch, cfg, crawl_id, robots, allowed, exact_hosts, results)
                    threading.Thread(target=_round_thread, args=args, daemon=True).start()
                    active += 1
                    launched += len(batch)
                    rounds += 1
            if active == 0:
                break
            item = results.get()
            if item is _DONE:
                active -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            res = item
            pages, dialogues, errors = split_results(res, cfg.text_rows, cfg.min_text_chars)
            store.write_batch(pages, dialogues, errors)
            _absorb(res, frontier)
            spent += res.num_rows
            launched -= res.num_rows
            counts["fetched"] += res.num_rows
            counts["error"] += len(errors)
            counts["dialogues"] += sum(len(d["turns"]) >= 2 for d in dialogues)
            counts["text_rows"] += sum(len(d["turns"]) == 1 for d in dialogues)
            counts["charset_mismatch"] += sum(bool(p["charset_mismatch"]) for p in pages)
            counts["links_offsite"] += sum(res.column("links_offsite").to_pylist())
            counts["links_bad_scheme"] += sum(res.column("links_bad_scheme").to_pylist())
            outcomes.update(p["outcome"] for p in pages)
            outcomes.update(e["kind"] for e in errors)
            bar.maybe(counts, len(frontier))
        bar.maybe(counts, len(frontier), force=True)
    finally:
        try:
            stop_limiter(handle)
        except Exception:  # already gone
            pass
    elapsed = time.monotonic() - t0
    summary = {
        "out": out, "rounds": rounds, "fetched": counts["fetched"],
        "pages": counts["fetched"] - counts["error"], "errors": counts["error"],
        "skipped_robots": sum(outcomes[k] for k in SKIP_KINDS),
        "outcomes": dict(sorted(outcomes.items())),
        "dialogues": counts["dialogues"], "text_rows": counts["text_rows"],
        "charset_mismatch": counts["charset_mismatch"], "links_offsite": counts["links_offsite"],
        "links_bad_scheme": counts["links_bad_scheme"], "queued": len(frontier),
        "total_fetched": spent, "budget_left": max(0, cfg.max_pages - spent),
        "elapsed_s": round(elapsed, 3), "pages_per_s": round(counts["fetched"] / max(elapsed, 1e-9), 2),
        "limiter": limiter_name(crawl_id),
    }
    store.write_state({**summary, "seeds": seeds, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "config": cfg.model_dump()})
    if progress:
        summary_table("crawl: pages by outcome", ["outcome", "URLs"], sorted(outcomes.items(), key=lambda kv: -kv[1]))
        summary_table("crawl: summary", ["what", "value"], [
            ("fetched (this run)", summary["fetched"]), ("errors", summary["errors"]),
            ("skipped by robots.txt", summary["skipped_robots"]), ("thread dialogues", summary["dialogues"]),
            ("text rows", summary["text_rows"]), ("charset mismatches", summary["charset_mismatch"]),
            ("offsite links", summary["links_offsite"]), ("non-http links", summary["links_bad_scheme"]),
            ("still queued", summary["queued"]), ("pages/s", summary["pages_per_s"]), ("output", out),
        ])
    return summary


def _absorb(res: pa.Table, frontier: Frontier) -> None:
    for url, final, depth, outcome, links in zip(*(res.column(c).to_pylist() for c in
                                                    ("url", "final_url", "depth", "outcome", "links"))):
        frontier.finish(url, final)
        d = depth if outcome == "redirected" else depth + 1
        for link in links or ():
            frontier.add(link, d)


_MAX_ROUNDS = 2   # Ray Data executions running at once (each up to cfg.workers tasks)
_DONE = object()


def _round_thread(batch, cfg, crawl_id, robots, allowed, exact_hosts, results: queue.Queue) -> None:
    try:
        for res in _run_round(batch, cfg, crawl_id, robots, allowed, exact_hosts):
            results.put(res)
    except BaseException as e:  # the driver re-raises it
        results.put(e)
    finally:
        results.put(_DONE)


def _run_round(batch: list[tuple[str, int]], cfg: CrawlConfig, crawl_id: str, robots: dict[str, Robots],
               allowed: list[str], exact_hosts: list[str]):
    """Yield RESULT_SCHEMA tables as the cluster finishes them."""
    import ray

    items = [{"url": u, "depth": d} for u, d in batch]
    blocks = max(1, math.ceil(len(items) / cfg.batch_size))
    robots_state = {o: r.to_state() for o, r in robots.items() if o in {origin_of(u) for u, _ in batch}}
    compute = ray.data.TaskPoolStrategy(size=min(cfg.workers, blocks))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    # batch_size=None: one task per block (blocks are already <= batch_size rows); a number
    # would make Ray Data bundle small blocks together and halve the parallelism.
    ds = ds.map_batches(crawl_batch, batch_size=None, batch_format="pyarrow", compute=compute,
                        num_cpus=cfg.cpus_per_worker,
                        fn_kwargs={"cfg": cfg, "crawl_id": crawl_id, "robots": robots_state,
                                   "allowed": allowed, "exact_hosts": exact_hosts})
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
