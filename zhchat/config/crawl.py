"""Config for the crawler (pipelines/crawl)."""

from __future__ import annotations

from pydantic import Field, field_validator

from .base import Section


class SelectorConfig(Section):
    """CSS selectors that turn a thread page into one dialogue: the post, then its replies."""

    url_pattern: str = Field(".*", description="Regex: apply these selectors to matching URLs")
    post: str = Field(..., description="CSS selector of the opening post / question")
    replies: str = Field(..., description="CSS selector of each reply / answer, in page order")


class CrawlConfig(Section):
    seeds: list[str] = Field(default_factory=list)
    out: str | None = None
    allowed_domains: list[str] = Field(default_factory=list, description="Empty: the seeds' hosts")
    max_depth: int = Field(2, ge=0)
    max_pages: int = Field(1000, ge=1)
    per_host_concurrency: int = Field(2, ge=1)
    per_host_rps: float = Field(2.0, gt=0, description="Requests per second per host, cluster-wide")
    user_agent: str = "zhchat-crawler/0.1 (+https://github.com/zhchat/zhchat)"
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(15.0, gt=0)
    max_page_bytes: int = Field(5_000_000, ge=1024)
    max_redirects: int = Field(5, ge=0)
    max_retries: int = Field(3, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    selectors: list[SelectorConfig] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _http_only(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"seed {url!r} is not an http(s) URL")
        return v
