"""Fetching: many URLs at once per task (asyncio + httpx), each one politely and safely.

Per URL: a lease from the cluster-wide host limiter before every request, streaming reads
that stop at the size cap, redirects followed by hand (bounded, loop-checked, robots-checked;
a redirect to another origin is handed back to the frontier so that origin's robots.txt and
limits apply), retries with exponential backoff on timeouts, connection errors, 429 and 5xx
(Retry-After honoured and shared with every worker through the limiter), none on other 4xx.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable, Protocol

import httpx
import pyarrow as pa

from zhchat.config import CrawlConfig

from .urls import BadURL, host_of, normalize_url, origin_of

TEXT_TYPES = ("text/html", "text/plain")
_REDIRECTS = (301, 302, 303, 307, 308)

FETCH_SCHEMA = pa.schema([
    ("url", pa.string()),
    ("depth", pa.int32()),
    ("final_url", pa.string()),
    ("status", pa.int32()),
    ("content_type", pa.string()),
    ("body", pa.binary()),
    ("fetched_at", pa.timestamp("ms", tz="UTC")),
    ("attempts", pa.int32()),
    ("error_kind", pa.string()),   # "" on success
    ("message", pa.string()),
    ("redirect_to", pa.string()),  # set when the page redirects to another origin
])


class Limiter(Protocol):
    async def acquire(self, host: str) -> int: ...
    def release(self, host: str, lease: int) -> None: ...
    async def pause(self, host: str, seconds: float) -> None: ...


class ActorLimiter:
    """Client side of the HostLimiter actor. release() is fire-and-forget: only acquire costs
    a round trip, so the limiter adds one actor call of latency per request."""

    def __init__(self, handle):
        self.h = handle

    async def acquire(self, host: str) -> int:
        return await self.h.acquire.remote(host)

    def release(self, host: str, lease: int) -> None:
        self.h.release.remote(host, lease)

    async def pause(self, host: str, seconds: float) -> None:
        await self.h.pause.remote(host, seconds)


class LocalLimiter:
    """The same limiter in-process (robots fetches without Ray, unit tests)."""

    def __init__(self, core):
        self.core = core
        self._tasks: set[asyncio.Task] = set()

    async def acquire(self, host: str) -> int:
        return await self.core.acquire(host)

    def release(self, host: str, lease: int) -> None:
        t = asyncio.get_running_loop().create_task(self.core.release(host, lease))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def pause(self, host: str, seconds: float) -> None:
        await self.core.pause(host, seconds)


class _Retry(Exception):
    def __init__(self, kind: str, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after


class _Fail(Exception):
    def __init__(self, kind: str, status: int, message: str):
        super().__init__(message)
        self.kind, self.status = kind, status


def retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


def make_client(cfg: CrawlConfig, max_connections: int) -> httpx.AsyncClient:
    timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s,
                            write=cfg.read_timeout_s, pool=cfg.page_timeout_s)
    return httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, headers={"User-Agent": cfg.user_agent},
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
    )


class Fetcher:
    """Fetches URLs with one client, one limiter and a robots check (`allowed(url) -> bool`)."""

    def __init__(self, cfg: CrawlConfig, client: httpx.AsyncClient, limiter: Limiter,
                 allowed: Callable[[str], bool] | None = None, any_text_type: bool = False):
        self.cfg, self.client, self.limiter = cfg, client, limiter
        self.allowed = allowed or (lambda url: True)
        self.any_text_type = any_text_type  # robots.txt is often served with odd types

    async def fetch(self, url: str, depth: int = 0) -> dict:
        """One row of FETCH_SCHEMA; never raises for a bad page."""
        cfg = self.cfg
        attempts = 0
        while True:
            attempts += 1
            try:
                row = await self._attempt(url)
                return _row(url, depth, attempts, **row)
            except _Fail as f:
                return _row(url, depth, attempts, status=f.status, error_kind=f.kind, message=str(f))
            except _Retry as r:
                err = r
            except Exception as e:  # an unforeseen failure stays this URL's problem
                return _row(url, depth, attempts, error_kind="internal", message=f"{type(e).__name__}: {e}")
            if attempts > cfg.max_retries:
                return _row(url, depth, attempts, status=err.status, error_kind=err.kind,
                            message=f"{err} (gave up after {attempts} attempts)")
            wait = err.retry_after if err.retry_after is not None else \
                cfg.backoff_s * 2 ** (attempts - 1) * random.uniform(0.8, 1.2)
            if wait > cfg.max_retry_after_s:
                return _row(url, depth, attempts, status=err.status, error_kind=err.kind,
                            message=f"{err}; asked to wait {wait:.0f}s > max_retry_after_s")
            await asyncio.sleep(wait)

    async def _attempt(self, url: str) -> dict:
        cfg = self.cfg
        chain = [url]
        current = url
        budget = cfg.page_timeout_s  # wall time of the HTTP part; limiter waits do not count
        while True:
            host = host_of(current)
            try:
                httpx.URL(current)
            except httpx.InvalidURL as e:
                raise _Fail("bad_url", 0, f"{current}: {e}") from None
            lease = await self.limiter.acquire(host)
            t0 = time.monotonic()
            try:
                status, headers, body = await asyncio.wait_for(self._get(current), max(0.001, budget))
            except asyncio.TimeoutError:
                raise _Retry("timeout", 0, f"no complete response within page_timeout_s={cfg.page_timeout_s}s") from None
            except httpx.TimeoutException as e:
                raise _Retry("timeout", 0, f"{type(e).__name__} at {current}") from None
            except httpx.DecodingError as e:
                raise _Fail("decoding", 0, f"content-encoding could not be decoded: {e}") from None
            except httpx.InvalidURL as e:
                # Our URL was checked below before sending: httpx parses a redirect's Location
                # even with follow_redirects=False, so this is the server's Location.
                raise _Fail("bad_redirect", 0, f"unusable redirect Location from {current}: {e}") from None
            except httpx.UnsupportedProtocol as e:
                raise _Fail("bad_url", 0, str(e)) from None
            except httpx.TransportError as e:
                raise _Retry("connection", 0, f"{type(e).__name__}: {e}") from None
            finally:
                self.limiter.release(host, lease)
            budget -= time.monotonic() - t0

            if status in _REDIRECTS:
                location = headers.get("location")
                if not location:
                    raise _Fail("http_status", status, f"{status} redirect without a Location header")
                try:
                    target = normalize_url(location, base=current)
                except BadURL as e:
                    raise _Fail("bad_redirect", status, str(e)) from None
                if target in chain:
                    raise _Fail("redirect_loop", status, " -> ".join(chain + [target]))
                if len(chain) > cfg.max_redirects:
                    raise _Fail("too_many_redirects", status, f"more than {cfg.max_redirects} redirects from {url}")
                if origin_of(target) != origin_of(url):
                    # Another origin: its own robots.txt, scope and dedup apply, so the frontier takes it.
                    return {"final_url": current, "status": status, "redirect_to": target}
                if not self.allowed(target):
                    raise _Fail("robots_disallowed", status, f"redirect target {target} is disallowed by robots.txt")
                chain.append(target)
                current = target
                continue
            if status == 429 or status >= 500:
                wait = retry_after_s(headers.get("retry-after"))
                if wait is not None and status in (429, 503):
                    await self.limiter.pause(host, min(wait, cfg.max_retry_after_s))
                raise _Retry("http_429" if status == 429 else "http_5xx", status, f"HTTP {status} from {current}", wait)
            if status >= 400:
                raise _Fail("http_4xx", status, f"HTTP {status} from {current}")
            if not 200 <= status < 300:
                raise _Fail("http_status", status, f"unexpected HTTP {status} from {current}")
            return {"final_url": current, "status": status, "content_type": headers.get("content-type", ""),
                    "body": body}

    async def _get(self, url: str) -> tuple[int, httpx.Headers, bytes]:
        cap = self.cfg.max_page_bytes
        async with self.client.stream("GET", url) as r:
            status = r.status_code
            if not 200 <= status < 300:
                return status, r.headers, b""  # error and redirect bodies are not read
            ctype = r.headers.get("content-type", "")
            mime = ctype.split(";")[0].strip().lower()
            if mime and mime not in TEXT_TYPES and not (self.any_text_type and mime.startswith("text/")):
                raise _Fail("content_type", status, f"{mime} is not text/html or text/plain")
            length = r.headers.get("content-length", "")
            if length.isdigit() and int(length) > cap:
                raise _Fail("too_large", status, f"Content-Length {length} > max_page_bytes={cap}")
            buf = bytearray()
            async for chunk in r.aiter_bytes():
                buf += chunk
                if len(buf) > cap:  # stop reading: the connection is dropped, not drained
                    raise _Fail("too_large", status, f"body passed max_page_bytes={cap}; stopped reading")
            if not mime and not (self.any_text_type or _looks_like_html(bytes(buf))):
                raise _Fail("content_type", status, "no Content-Type and the body is not HTML")
            return status, r.headers, bytes(buf)


def _row(url: str, depth: int, attempts: int, *, final_url: str = "", status: int = 0, content_type: str = "",
         body: bytes = b"", error_kind: str = "", message: str = "", redirect_to: str = "") -> dict:
    return {"url": url, "depth": depth, "final_url": final_url or url, "status": status,
            "content_type": content_type, "body": body, "fetched_at": datetime.now(timezone.utc),
            "attempts": attempts, "error_kind": error_kind, "message": message[:2000], "redirect_to": redirect_to}


async def fetch_many(rows: list[dict], cfg: CrawlConfig, limiter: Limiter,
                     allowed: Callable[[str], bool] | None = None) -> list[dict]:
    """Fetch rows ({url, depth}) with up to cfg.fetch_concurrency in flight (the limiter still decides)."""
    sem = asyncio.Semaphore(cfg.fetch_concurrency)
    async with make_client(cfg, cfg.fetch_concurrency) as client:
        fetcher = Fetcher(cfg, client, limiter, allowed)

        async def one(row: dict) -> dict:
            async with sem:
                return await fetcher.fetch(row["url"], int(row.get("depth", 0)))

        return await asyncio.gather(*(one(r) for r in rows))


def fetch_batch(batch: pa.Table, *, cfg: CrawlConfig, crawl_id: str, robots: dict[str, dict]) -> pa.Table:
    """Ray Data UDF: a batch of {url, depth} -> FETCH_SCHEMA rows, fetched concurrently."""
    from .politeness import Robots, lookup_limiter

    rules = {origin: Robots.from_state(s, cfg.user_agent) for origin, s in robots.items()}

    def allowed(url: str) -> bool:
        r = rules.get(origin_of(url))
        return r is None or r.allowed(url)

    limiter = ActorLimiter(lookup_limiter(crawl_id))
    rows = asyncio.run(fetch_many(batch.select(["url", "depth"]).to_pylist(), cfg, limiter, allowed))
    return pa.Table.from_pylist(rows, schema=FETCH_SCHEMA)
