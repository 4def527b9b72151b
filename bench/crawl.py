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

from crawl_site import tree_routes  # noqa: E402

ARTICLE = ("这是一篇测试文章，讲的是北京的秋天：香山的红叶、胡同里的糖炒栗子和早晚的凉风。"
           "作者说，最好的季节就是现在，周末约上朋友去爬山，再去吃一顿涮羊肉。") * 3


def _site_process(n_lists: int, per_list: int, delay: float, conn) -> None:
    """The site in its own process, on aiohttp's asyncio server, as a real site would be: a
    thread-per-connection Python server in the bench's process would make its requests wait
    for the GIL behind the crawl driver and add latency that no real server adds."""
    import asyncio

    from aiohttp import web

    routes = tree_routes(n_lists, per_list, ARTICLE)
    hits: list[tuple[str, float, float]] = []
    state = {"active": 0, "peak": 0}

    async def handle(request: web.Request) -> web.Response:
        start = time.monotonic()
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        reply = routes.get(request.path)
        await asyncio.sleep(delay)
        state["active"] -= 1
        hits.append((request.path, start, time.monotonic()))
        if reply is None:
            return web.Response(status=404, text="not found")
        return web.Response(status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type})

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(runner.addresses[0][1])
        loop = asyncio.get_running_loop()
        while (cmd := await loop.run_in_executor(None, conn.recv)) != "stop":
            if cmd == "reset":
                hits.clear()
                state["peak"] = state["active"]
                conn.send(True)
            elif cmd == "hits":
                conn.send((list(hits), state["peak"]))
        await runner.cleanup()

    asyncio.run(main())


class RemoteSite:
    """tree_site(...) served from a child process; monotonic clocks are shared on Linux."""

    def __init__(self, n_lists: int, per_list: int, delay: float):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_site_process, args=(n_lists, per_list, delay, child), daemon=True)
        self.proc.start()
        self.port = self.conn.recv()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reset_log(self) -> None:
        self.conn.send("reset")
        self.conn.recv()

    def hits(self) -> tuple[list[tuple[str, float, float]], int]:
        self.conn.send("hits")
        return self.conn.recv()

    def __enter__(self) -> "RemoteSite":
        return self

    def __exit__(self, *exc) -> None:
        self.conn.send("stop")
        self.proc.join(10)


def sequential(urls: list[str], user_agent: str) -> float:
    """Pages/s of one httpx.Client fetching one URL after another (keep-alive on)."""
    import httpx

    with httpx.Client(headers={"User-Agent": user_agent}) as client:
        t = time.perf_counter()
        for u in urls:
            client.get(u).raise_for_status()
        return len(urls) / (time.perf_counter() - t)


def served_concurrency(server: RemoteSite) -> tuple[float, int]:
    """Average requests in flight at the server over the crawl, and the peak."""
    all_hits, peak = server.hits()
    hits = [(start, end) for path, start, end in all_hits if path != "/robots.txt"]
    span = max(e for _, e in hits) - min(s for s, _ in hits)
    return sum(e - s for s, e in hits) / span, peak


def main() -> None:
    from zhchat.config import CrawlConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000, help="At least this many pages on the site")
    ap.add_argument("--quick", action="store_true", help="~200 pages: a smoke run")
    ap.add_argument("--delay", type=float, default=0.05, help="Server seconds per request")
    ap.add_argument("--concurrency", type=int, default=8, help="per_host_concurrency N")
    defaults = CrawlConfig.model_fields
    ap.add_argument("--workers", type=int, default=defaults["workers"].default,
                    help="Ray Data fetch tasks at once (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=defaults["batch_size"].default,
                    help="URLs per task, also its requests in flight (default: the config's)")
    ap.add_argument("--num-cpus", type=int, default=4, help="Logical CPUs of the local Ray cluster")
    ap.add_argument("--sequential-pages", type=int, default=100)
    args = ap.parse_args()
    pages = 200 if args.quick else args.pages
    per_list = 50 if pages >= 1000 else 20
    n_lists = max(1, math.ceil((pages - 1) / (per_list + 1)))

    import ray

    from pipelines.crawl import crawl

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    work = tempfile.mkdtemp(prefix="zhchat-bench-crawl-")
    try:
        cfg = dict(per_host_concurrency=args.concurrency, per_host_rps=1e6, max_depth=2, max_pages=10 ** 6,
                   workers=args.workers, batch_size=args.batch_size, fetch_concurrency=args.batch_size)
        with RemoteSite(n_lists, per_list, args.delay) as server:
            total = 1 + n_lists + n_lists * per_list
            article_urls = [server.url(f"/a/{i}/{j}.html") for i in range(n_lists) for j in range(per_list)]
            seq = sequential(article_urls[: min(args.sequential_pages, len(article_urls))], "zhchat-bench/0.1")
            # Warm-up right before the timed crawl: the same crawl of a twin site, so the Ray
            # workers of both overlapping rounds exist and have imported the crawler, as they
            # would long before the 2,000th page of a real crawl. (Ray reaps workers idle for
            # long, so the sequential loop goes first.) Cold start is reported separately.
            with RemoteSite(n_lists, per_list, args.delay) as warm:
                t = time.perf_counter()
                cold = crawl(CrawlConfig(seeds=[warm.url("/")], **cfg), os.path.join(work, "warm"), progress=False)
                cold_pps = cold["fetched"] / (time.perf_counter() - t)
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
            "sequential_pages_per_s": round(seq, 1), "cold_start_pages_per_s": round(cold_pps, 1), "speedup_vs_sequential": round(pps / seq, 2),
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
