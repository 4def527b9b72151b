"""Crawler throughput against a loopback site with a fixed per-request server delay.

With a per-host limit of N requests in flight (rate limit set high) and a server that takes
D seconds per request, no polite crawler can beat N / D pages/s. We report the crawler's
pages/s against that bound (efficiency), a plain sequential fetch loop for comparison, and
the concurrency the server actually saw.

    python bench/crawl.py            # >= 2,000 pages (the real run; not on a shared machine)
    python bench/crawl.py --quick    # ~200 pages, a smoke run

Last line: one JSON object {"efficiency": …, "pages_per_s": …, …}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from crawl_site import tree_site  # noqa: E402


def sequential(urls: list[str], user_agent: str) -> float:
    """Pages/s of one httpx.Client fetching one URL after another (keep-alive on)."""
    import httpx

    with httpx.Client(headers={"User-Agent": user_agent}) as client:
        t = time.perf_counter()
        for u in urls:
            client.get(u).raise_for_status()
        return len(urls) / (time.perf_counter() - t)


def served_concurrency(server) -> tuple[float, int]:
    """Average requests in flight at the server over the crawl, and the peak."""
    hits = [h for h in server.hits if h.path != "/robots.txt" and h.end]
    span = max(h.end for h in hits) - min(h.start for h in hits)
    return sum(h.end - h.start for h in hits) / span, server.max_active


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000, help="At least this many pages on the site")
    ap.add_argument("--quick", action="store_true", help="~200 pages: a smoke run")
    ap.add_argument("--delay", type=float, default=0.05, help="Server seconds per request")
    ap.add_argument("--concurrency", type=int, default=8, help="per_host_concurrency N")
    ap.add_argument("--workers", type=int, default=4, help="Ray Data fetch tasks at once")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-cpus", type=int, default=4, help="Logical CPUs of the local Ray cluster")
    ap.add_argument("--sequential-pages", type=int, default=100)
    args = ap.parse_args()
    pages = 200 if args.quick else args.pages
    per_list = 50 if pages >= 1000 else 20
    n_lists = max(1, math.ceil((pages - 1) / (per_list + 1)))

    import ray

    from pipelines.crawl import crawl
    from zhchat.config import CrawlConfig

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    work = tempfile.mkdtemp(prefix="zhchat-bench-crawl-")
    try:
        cfg = dict(per_host_concurrency=args.concurrency, per_host_rps=1e6, max_depth=2, max_pages=10 ** 6,
                   workers=args.workers, batch_size=args.batch_size, fetch_concurrency=args.batch_size)
        # Warm-up: start one Ray worker per fetch task and import the crawler there, as a long
        # crawl would have long before its 2,000th page (the last round has `workers` blocks).
        with tree_site(args.workers, args.batch_size, delay=args.delay) as warm:
            crawl(CrawlConfig(seeds=[warm.url("/")], **cfg), os.path.join(work, "warm"), progress=False)

        with tree_site(n_lists, per_list, delay=args.delay) as server:
            total = 1 + n_lists + n_lists * per_list
            article_urls = [server.url(f"/a/{i}/{j}.html") for i in range(n_lists) for j in range(per_list)]
            seq = sequential(article_urls[: min(args.sequential_pages, len(article_urls))], "zhchat-bench/0.1")
            server.reset_log()
            t = time.perf_counter()
            summary = crawl(CrawlConfig(seeds=[server.url("/")], **cfg), os.path.join(work, "out"), progress=False)
            wall = time.perf_counter() - t
            avg_conc, peak = served_concurrency(server)
        assert summary["pages"] == total, f"crawled {summary['pages']} of {total} pages: {summary['outcomes']}"
        bound = args.concurrency / args.delay
        pps = summary["fetched"] / wall
        result = {
            "efficiency": round(pps / bound, 3), "pages_per_s": round(pps, 1), "bound_pages_per_s": round(bound, 1),
            "sequential_pages_per_s": round(seq, 1), "speedup_vs_sequential": round(pps / seq, 2),
            "avg_concurrency": round(avg_conc, 2), "peak_concurrency": peak, "pages": summary["fetched"],
            "rounds": summary["rounds"], "wall_s": round(wall, 2), "concurrency": args.concurrency,
            "delay_s": args.delay, "workers": args.workers, "batch_size": args.batch_size,
        }
        print(f"crawler {pps:.1f} pages/s = {result['efficiency']:.0%} of N/delay = {bound:.0f}; sequential "
              f"{seq:.1f} pages/s; server saw {avg_conc:.2f} in flight on average, {peak} at most", file=sys.stderr)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
