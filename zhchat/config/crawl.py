"""Config for the crawler (pipelines/crawl)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from .base import Section


class SelectorConfig(Section):
    """CSS selectors that turn a thread page into one dialogue: the post, then its replies."""

    url_pattern: str = Field(".*", description="Regex: apply these selectors to matching URLs")
    post: str = Field(..., description="CSS selector of the opening post / question")
    replies: str = Field(..., description="CSS selector of each reply / answer, in page order")

    @field_validator("url_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"url_pattern {v!r} is not a valid regex: {e}") from e
        return v

    @field_validator("post", "replies")
    @classmethod
    def _css(cls, v: str) -> str:
        from selectolax.lexbor import LexborHTMLParser

        try:
            LexborHTMLParser("<p></p>").css(v)
        except Exception as e:  # selectolax raises ValueError or SelectolaxError
            raise ValueError(f"{v!r} is not a valid CSS selector: {e}") from e
        return v


class CrawlConfig(Section):
    seeds: list[str] = Field(default_factory=list)
    out: str | None = None
    allowed_domains: list[str] = Field(
        default_factory=list, description="Hosts (and their subdomains) to follow; empty: the seeds' hosts exactly")
    max_depth: int = Field(2, ge=0, description="Link hops from a seed (seeds are depth 0)")
    max_pages: int = Field(1000, ge=1, description="Fetch budget over all runs of this crawl (pages + errors)")
    per_host_concurrency: int = Field(2, ge=1, description="Requests in flight per host, cluster-wide")
    per_host_rps: float = Field(2.0, gt=0, description="Requests per second per host, cluster-wide")
    user_agent: str = "zhchat-crawler/0.1 (+https://github.com/zhchat/zhchat)"
    obey_robots: bool = Field(True, description="Obey robots.txt rules and Crawl-delay")
    max_crawl_delay_s: float = Field(30.0, ge=0, description="Cap on a robots.txt Crawl-delay")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(15.0, gt=0, description="Longest wait for the next bytes")
    page_timeout_s: float = Field(60.0, gt=0, description="Longest one attempt (all redirects) may take")
    max_page_bytes: int = Field(5_000_000, ge=1024, description="Bodies larger than this are not kept")
    max_redirects: int = Field(5, ge=0)
    max_retries: int = Field(3, ge=0, description="Retries after the first attempt (timeouts, connection errors, 429, 5xx)")
    backoff_s: float = Field(0.5, ge=0, description="First retry waits this long, doubling each time")
    max_retry_after_s: float = Field(120.0, ge=0, description="A longer Retry-After gives up instead of waiting")
    workers: int = Field(2, ge=1, description="Ray Data fetch tasks running at once")
    cpus_per_worker: float = Field(0.25, gt=0, description="Logical CPUs per fetch task (fetching is I/O-bound)")
    # 64 rather than 32: every task start and end costs its host slots a ramp (bench/crawl.py:
    # 0.80 of the bound at 32, 0.84 at 64); a killed crawl loses at most workers x batch_size pages.
    batch_size: int = Field(64, ge=1, description="URLs per Ray Data batch (one task fetches them concurrently)")
    fetch_concurrency: int = Field(64, ge=1, description="Requests in flight per task (the host limiter still holds)")
    extract_fast: bool = Field(
        True, description="trafilatura without its fallback extractors: ~4x less CPU per page, a little less recall")
    text_rows: bool = Field(True, description="Pages with main text but no dialogue selector match become one-turn rows")
    min_text_chars: int = Field(10, ge=0, description="Shorter main texts make no text row")
    selectors: list[SelectorConfig] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _http_only(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"seed {url!r} is not an http(s) URL")
        return v

    @field_validator("allowed_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.strip().lower().lstrip(".")
            if not d or "/" in d or ":" in d:
                raise ValueError(f"allowed domain {d!r} must be a bare host name like 'example.com'")
            out.append(d)
        return out

    @model_validator(mode="after")
    def _timeouts(self):
        if self.page_timeout_s < self.connect_timeout_s:
            raise ValueError("page_timeout_s must be at least connect_timeout_s")
        return self
