"""`zhchat crawl`: a polite, parallel, resumable, Chinese-aware crawler on Ray Data.

Files: urls (normalise, scope), limiter (the cluster-wide host limiter actor and its clients),
robots (robots.txt rules and fetching them),
fetch (aiohttp, retries, redirects, caps), decode (charsets), extract (text, links, threads),
process (bytes -> rows), frontier, output (Parquet parts, resume), stage (the driver loop).
"""

from __future__ import annotations

from zhchat.config import CrawlConfig, RunConfig


def crawl(cfg: CrawlConfig, out: str, progress: bool = True) -> dict:
    """Crawl cfg.seeds into `out` (see stage.crawl). Imported lazily: Ray workers import this
    package for fetch/process and need none of the driver's modules."""
    from .stage import crawl as _crawl

    return _crawl(cfg, out, progress=progress)


def run_crawl(cfg: RunConfig, args=None) -> dict:
    """CLI entry: crawl cfg.crawl.seeds into cfg.crawl.out (resolved by the CLI)."""
    from zhchat.runtime import init_ray

    init_ray(cfg.ray)
    return crawl(cfg.crawl, cfg.crawl.out or cfg.path("crawl"))


__all__ = ["run_crawl", "crawl"]
